"""``python -m kling_async``: the ``kling-async`` command."""

from kling_async._cli import main

if __name__ == "__main__":
    main(prog_name="python -m kling_async")
