#!/usr/bin/env python3
"""The PyTorch peer of amaq's CUDA codec kernels (issue: GPU training, "kernel speed").

The same affine codec as amaq's fixed/amaq packets, written as plain PyTorch ops a user would write:
per (row, group of 128 channels) ranges relative to the tensor's max |x| as fp16 rounded outward,
round-to-nearest codes, codes packed least significant bit first (4-bit pairs for the fixed map, a
scatter of shifted codes for a mixed AMAQ map), ranges and codes copied into pinned host memory.
Decode goes the other way, from pinned host memory to a device tensor. Each is timed eager and under
torch.compile, on an (8, 512, 2048) activation like bench/codec_bench.cpp's, fp32 and bf16 input.

Prints one JSON line per case: ms per call (median of `--iters`), GB/s of fp32-equivalent input
(the unit of amaq_bench's cuda/ rows), and the packed bytes. Needs a GPU.
Usage: python3 tools/ref/codec_peer.py [--iters 50]
"""
import argparse
import json
import statistics
import sys
import time

import torch

R, C, G = 8 * 512, 2048, 128


def activation(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 512, 2048, generator=g)
    x[:, :, 17] *= 40  # an outlier channel, as in codec_bench.cpp
    return x.view(R, C).to("cuda", dtype)


def bit_map(kind):
    if kind == "fixed4":
        return torch.full((C,), 4, dtype=torch.int64)
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, 7, (C,), generator=g)  # mean ~4 bits, as codec_bench.cpp's AMAQ map


def half_rounded(v, up):
    """v (fp32) to the nearest fp16, moved one ulp outward where that lies past v; int32 bit patterns."""
    h = v.half()
    back = h.float()
    need = back < v if up else back > v
    b = h.view(torch.int16).int() & 0xFFFF
    neg = (b & 0x8000) != 0
    mag = b & 0x7FFF
    toward = torch.where(neg != up, b + 1, b - 1)
    zero = torch.full_like(b, 0x0001 if up else 0x8001)
    moved = torch.where(mag == 0, zero, toward)
    return torch.where(need, moved, b)


def pow2_scale(amax):
    """amaq's tensor scale: the power of two putting max |x| in [2^14, 2^15) (>= 2^-149), 1 for all zeros."""
    _, e = torch.frexp(amax)
    k = (e - 15).clamp(min=-149)
    return torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), k), torch.ones_like(amax))


def make_codec(bits):
    bits_d = bits.cuda()
    qmax = (2.0 ** bits_d.float() - 1).view(C // G, G)
    offsets = torch.zeros(C + 1, dtype=torch.int64)
    offsets[1:] = bits.cumsum(0)
    row_bits = int(offsets[-1])
    nbytes = (R * row_bits + 7) // 8
    pos = (torch.arange(R, device="cuda").view(R, 1) * row_bits + offsets[:-1].cuda().view(1, C))  # bit positions
    byte_at, shift = pos >> 3, pos & 7
    mask = (2 ** bits_d - 1).view(1, C)
    fixed4 = bool((bits == 4).all())

    def encode(x, host):
        xf = x.float()
        amax = xf.abs().amax()
        scale = pow2_scale(amax)
        g = xf.view(R, C // G, G)
        lo16 = half_rounded(g.amin(-1) / scale, False)
        hi16 = half_rounded(g.amax(-1) / scale, True)
        lo = lo16.to(torch.int16).view(torch.float16).float() * scale
        hi = hi16.to(torch.int16).view(torch.float16).float() * scale
        step = (hi - lo).unsqueeze(-1) / qmax
        u = (g - lo.unsqueeze(-1)) / torch.where(step > 0, step, torch.ones_like(step))
        codes = torch.where(step > 0, torch.round(torch.minimum(u.clamp_min(0), qmax)), torch.zeros_like(u))
        codes = codes.view(R, C).to(torch.int64)
        if fixed4:
            c2 = codes.view(R, C // 2, 2)
            packed = (c2[..., 0] | (c2[..., 1] << 4)).to(torch.uint8).view(-1)
        else:
            v = codes << shift
            acc = torch.zeros(nbytes + 1, dtype=torch.int64, device="cuda")
            acc.index_add_(0, byte_at.view(-1), (v & 0xFF).view(-1))
            acc.index_add_(0, byte_at.view(-1) + 1, (v >> 8).view(-1))
            packed = acc[:nbytes].to(torch.uint8)
        ranges = torch.stack([lo16, hi16], -1).to(torch.int16).view(torch.uint8).view(-1)
        return ranges, packed

    def encode_to_host(x, host, enc):
        ranges, packed = enc(x, host)
        host[: ranges.numel()].copy_(ranges, non_blocking=True)
        host[ranges.numel(): ranges.numel() + packed.numel()].copy_(packed, non_blocking=True)
        torch.cuda.synchronize()
        return ranges.numel() + packed.numel()

    def decode(data, scale, dtype):
        ranges = data[: 4 * (R * C // G)].view(torch.int16).view(torch.float16).view(R, C // G, 2).float()
        packed = data[4 * (R * C // G):]
        lo, hi = ranges[..., 0] * scale, ranges[..., 1] * scale
        step = (hi - lo).unsqueeze(-1) / qmax
        if fixed4:
            p = packed.view(R, C // 2).int()
            codes = torch.stack([p & 15, p >> 4], -1).view(R, C // G, G)
        else:
            b = packed.int()
            b = torch.cat([b, torch.zeros(1, dtype=torch.int32, device="cuda")])
            two = b[byte_at] | (b[byte_at + 1] << 8)
            codes = ((two >> shift) & mask).view(R, C // G, G)
        return (lo.unsqueeze(-1) + codes.float() * step).view(R, C).to(dtype)

    def decode_from_host(host, n, scale, dtype, dec):
        data = host[:n].to("cuda", non_blocking=True)
        y = dec(data, scale, dtype)
        torch.cuda.synchronize()
        return y

    return encode, encode_to_host, decode, decode_from_host, nbytes


def timed(fn, iters):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no GPU", file=sys.stderr)
        return 1
    fp32_bytes = R * C * 4
    rc = 0
    for kind in ("fixed4", "amaq"):
        encode, encode_to_host, decode, decode_from_host, nbytes = make_codec(bit_map(kind))
        host = torch.empty(4 * (R * C // G) + nbytes, dtype=torch.uint8).pin_memory()
        for dtype in (torch.float32, torch.bfloat16):
            x = activation(dtype)
            scale = float(pow2_scale(x.float().abs().amax()))
            for mode in ("eager", "compile"):
                try:
                    enc = encode if mode == "eager" else torch.compile(encode, dynamic=False)
                    dec = decode if mode == "eager" else torch.compile(decode, dynamic=False)
                    n = encode_to_host(x, host, enc)
                    y = decode_from_host(host, n, scale, dtype, dec)
                    err = float((y.float() - x.float()).abs().max())
                    t_enc = timed(lambda: encode_to_host(x, host, enc), a.iters)
                    t_dec = timed(lambda: decode_from_host(host, n, scale, dtype, dec), a.iters)
                    for op, t in (("encode", t_enc), ("decode", t_dec)):
                        print(json.dumps(dict(peer="pytorch-codec", mode=mode, op=op, map=kind,
                                              dtype=str(dtype).replace("torch.", ""), ms=round(t, 4),
                                              gb_per_s=round(fp32_bytes / t / 1e6, 1), bytes=n,
                                              max_abs_error=round(err, 4), torch=torch.__version__)), flush=True)
                except Exception as e:  # one case failing leaves the others
                    print(json.dumps(dict(peer="pytorch-codec", mode=mode, map=kind, dtype=str(dtype),
                                          error=repr(e)[:300])), flush=True)
                    rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
