"""A tiny MP4 writer: real, playable H.264 files of a few KB for the simulator to serve.

Each file is an ISO base media file (``ftyp``, ``moov``, ``mdat``) holding one H.264
Baseline video track of 32x32 pixels, two frames long, whose frames last as long as the
video says. The frames are coded as I_PCM macroblocks (raw samples, no prediction and no
transform), which every H.264 decoder must accept, so no encoder is needed: the bit
writer below follows the syntax of ITU-T H.264, sections 7.3.2.1 (SPS), 7.3.2.2 (PPS),
7.3.3 (slice header) and 7.3.5 (macroblock layer). Colours come from the video id, so
every task's file differs.

It shares nothing with the client: the client checks what it downloads with its own
reader of box headers.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

__all__ = ["FRAME_SIZE", "mp4_video"]

#: Width and height of the video, in pixels (two macroblocks each way).
FRAME_SIZE: Final = 32
_MBS: Final = FRAME_SIZE // 16
_FRAMES: Final = 2
_TIMESCALE: Final = 1000  # milliseconds
_I_PCM: Final = 25  # mb_type of an I_PCM macroblock in an I slice


class _Bits:
    """An H.264 RBSP bit writer: fixed-width fields and Exp-Golomb codes."""

    def __init__(self) -> None:
        self._bits: list[int] = []

    def u(self, width: int, value: int) -> None:
        self._bits.extend((value >> shift) & 1 for shift in range(width - 1, -1, -1))

    def ue(self, value: int) -> None:
        code = value + 1
        self.u(code.bit_length() * 2 - 1, code)  # leading zeros, then the code itself

    def se(self, value: int) -> None:
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def align(self) -> None:
        while len(self._bits) % 8:
            self._bits.append(0)

    def raw(self, data: bytes) -> None:
        for byte in data:
            self.u(8, byte)

    def trailing(self) -> bytes:
        """rbsp_trailing_bits: a stop bit, then zeros to the byte boundary."""
        self._bits.append(1)
        self.align()
        bits = self._bits
        return bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))


def _nal(header: int, rbsp: bytes) -> bytes:
    """A NAL unit: its header byte and the RBSP with emulation-prevention bytes."""
    out = bytearray([header])
    zeros = 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _sps() -> bytes:
    bits = _Bits()
    bits.u(8, 66)  # profile_idc: Baseline
    bits.u(8, 0)  # constraint flags, reserved
    bits.u(8, 10)  # level_idc 1.0
    bits.ue(0)  # seq_parameter_set_id
    bits.ue(0)  # log2_max_frame_num_minus4
    bits.ue(0)  # pic_order_cnt_type
    bits.ue(0)  # log2_max_pic_order_cnt_lsb_minus4
    bits.ue(0)  # max_num_ref_frames
    bits.u(1, 0)  # gaps_in_frame_num_value_allowed_flag
    bits.ue(_MBS - 1)  # pic_width_in_mbs_minus1
    bits.ue(_MBS - 1)  # pic_height_in_map_units_minus1
    bits.u(1, 1)  # frame_mbs_only_flag
    bits.u(1, 0)  # direct_8x8_inference_flag
    bits.u(1, 0)  # frame_cropping_flag
    bits.u(1, 0)  # vui_parameters_present_flag
    return _nal(0x67, bits.trailing())


def _pps() -> bytes:
    bits = _Bits()
    bits.ue(0)  # pic_parameter_set_id
    bits.ue(0)  # seq_parameter_set_id
    bits.u(1, 0)  # entropy_coding_mode_flag: CAVLC
    bits.u(1, 0)  # bottom_field_pic_order_in_frame_present_flag
    bits.ue(0)  # num_slice_groups_minus1
    bits.ue(0)  # num_ref_idx_l0_default_active_minus1
    bits.ue(0)  # num_ref_idx_l1_default_active_minus1
    bits.u(1, 0)  # weighted_pred_flag
    bits.u(2, 0)  # weighted_bipred_idc
    bits.se(0)  # pic_init_qp_minus26
    bits.se(0)  # pic_init_qs_minus26
    bits.se(0)  # chroma_qp_index_offset
    bits.u(1, 0)  # deblocking_filter_control_present_flag
    bits.u(1, 0)  # constrained_intra_pred_flag
    bits.u(1, 0)  # redundant_pic_cnt_present_flag
    return _nal(0x68, bits.trailing())


def _frame(index: int, colours: list[tuple[int, int, int]]) -> bytes:
    """One IDR picture: a slice of I_PCM macroblocks, each one flat colour (Y, Cb, Cr)."""
    bits = _Bits()
    bits.ue(0)  # first_mb_in_slice
    bits.ue(7)  # slice_type: I (every slice of the picture)
    bits.ue(0)  # pic_parameter_set_id
    bits.u(4, 0)  # frame_num (always 0 in an IDR picture)
    bits.ue(index % 2)  # idr_pic_id: consecutive IDR pictures differ
    bits.u(4, 0)  # pic_order_cnt_lsb
    bits.u(1, 0)  # no_output_of_prior_pics_flag
    bits.u(1, 0)  # long_term_reference_flag
    bits.se(0)  # slice_qp_delta
    for mb in range(_MBS * _MBS):
        y, cb, cr = colours[(mb + index) % len(colours)]
        bits.ue(_I_PCM)
        bits.align()  # pcm_alignment_zero_bit
        bits.raw(bytes([y]) * 256 + bytes([cb]) * 64 + bytes([cr]) * 64)
    return _nal(0x65, bits.trailing())


def _box(kind: bytes, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *parts)


_MATRIX: Final = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def _moov(duration: int, deltas: list[int], sizes: list[int], offset: int) -> bytes:
    size = FRAME_SIZE << 16  # 16.16 fixed point
    sps, pps = _sps(), _pps()
    avcc = _box(
        b"avcC",
        bytes([1, 66, 0, 10, 0xFF, 0xE1]),
        struct.pack(">H", len(sps)),
        sps,
        bytes([1]),
        struct.pack(">H", len(pps)),
        pps,
    )
    avc1 = _box(
        b"avc1",
        bytes(6),
        struct.pack(">H", 1),  # data_reference_index
        bytes(16),
        struct.pack(">HHIIIH", FRAME_SIZE, FRAME_SIZE, 0x480000, 0x480000, 0, 1),
        bytes([10]) + b"kling-sim".ljust(31, b"\0"),  # compressorname (Pascal string)
        struct.pack(">Hh", 0x18, -1),
        avcc,
    )
    stts = struct.pack(">I", len(deltas)) + b"".join(struct.pack(">II", 1, d) for d in deltas)
    stbl = _box(
        b"stbl",
        _full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
        _full_box(b"stts", 0, 0, stts),
        _full_box(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, len(sizes), 1)),
        _full_box(
            b"stsz", 0, 0, struct.pack(">II", 0, len(sizes)), *(struct.pack(">I", s) for s in sizes)
        ),
        _full_box(b"stco", 0, 0, struct.pack(">II", 1, offset)),
    )
    minf = _box(
        b"minf",
        _full_box(b"vmhd", 0, 1, bytes(8)),
        _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1))),
        stbl,
    )
    mdia = _box(
        b"mdia",
        _full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, _TIMESCALE, duration, 0x55C4, 0)),
        _full_box(b"hdlr", 0, 0, bytes(4), b"vide", bytes(12), b"VideoHandler\0"),
        minf,
    )
    tkhd = _full_box(
        b"tkhd",
        0,
        3,  # enabled, in movie
        struct.pack(">IIIII", 0, 0, 1, 0, duration),
        bytes(8),
        struct.pack(">hhhH", 0, 0, 0, 0),
        _MATRIX,
        struct.pack(">II", size, size),
    )
    mvhd = _full_box(
        b"mvhd",
        0,
        0,
        struct.pack(">IIIIIH", 0, 0, _TIMESCALE, duration, 0x10000, 0x100),
        bytes(10),
        _MATRIX,
        bytes(24),
        struct.pack(">I", 2),  # next_track_ID
    )
    return _box(b"moov", mvhd, _box(b"trak", tkhd, mdia))


def mp4_video(video_id: str, duration: float = 5.0, size: int = 0) -> bytes:
    """A playable MP4 for `video_id`, `duration` seconds long, padded to `size` bytes.

    The colours come from the id, so two ids give two different files. When `size` is
    more than the video needs, a top-level ``free`` box fills the rest (the file stays a
    valid MP4); a smaller `size` is ignored.
    """
    digest = hashlib.sha256(video_id.encode()).digest()
    colours = [
        (32 + digest[i] % 190, 32 + digest[i + 1] % 190, 32 + digest[i + 2] % 190)
        for i in range(0, 12, 3)
    ]
    frames = [
        struct.pack(">I", len(nal)) + nal for nal in (_frame(i, colours) for i in range(_FRAMES))
    ]
    total_ms = max(round(duration * _TIMESCALE), _FRAMES)
    deltas = [total_ms // _FRAMES] * (_FRAMES - 1)
    deltas.append(total_ms - sum(deltas))
    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isomiso2avc1mp41")
    sizes = [len(frame) for frame in frames]
    moov = _moov(total_ms, deltas, sizes, 0)
    offset = len(ftyp) + len(moov) + 8  # the samples start right after mdat's header
    moov = _moov(total_ms, deltas, sizes, offset)
    video = ftyp + moov + _box(b"mdat", *frames)
    padding = size - len(video)
    if padding >= 8:
        video += _box(b"free", bytes(padding - 8))
    return video
