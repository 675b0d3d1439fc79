# The loop a user would write instead of amaq on one CPU machine: a Llama-shaped decoder in plain
# PyTorch eager (RMSNorm, RoPE, GQA with an explicit causal softmax, SiLU MLP, untied head), LoRA on
# every linear layer of the decoder, AdamW, global gradient clipping, fp32. Same shapes as the amaq
# run it is compared with (tools/cpu_step_bench.sh). Random weights and tokens: only the time counts.
#
# Usage (Debian's python3-torch): /usr/bin/python3 plain_lora_loop.py --hidden 512 --layers 4 --heads 8
#   --kv-heads 4 --intermediate 1376 --vocab 259 --batch 8 --seq 128 --rank 8 --steps 40 --threads 2
# Prints one JSON line: the median step time after `--warmup` steps.
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    def __init__(self, d_in, d_out, rank, alpha):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.02, requires_grad=False)
        self.lora_a = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))
        self.lora_b = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope(x, cos, sin):  # x (B, H, T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = a.heads, a.kv_heads, a.hidden // a.heads
        lin = lambda i, o: LoRALinear(i, o, a.rank, 2 * a.rank)
        self.q = lin(a.hidden, a.heads * self.head_dim)
        self.k = lin(a.hidden, a.kv_heads * self.head_dim)
        self.v = lin(a.hidden, a.kv_heads * self.head_dim)
        self.o = lin(a.heads * self.head_dim, a.hidden)
        self.gate, self.up, self.down = lin(a.hidden, a.intermediate), lin(a.hidden, a.intermediate), lin(a.intermediate, a.hidden)
        self.norm1, self.norm2 = RMSNorm(a.hidden), RMSNorm(a.hidden)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        y = att.softmax(-1) @ v
        x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Model(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.embed = nn.Embedding(a.vocab, a.hidden)
        self.embed.weight.requires_grad_(False)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = RMSNorm(a.hidden)
        self.head = nn.Linear(a.hidden, a.vocab, bias=False)
        self.head.weight.requires_grad_(False)
        d = a.hidden // a.heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
        ang = torch.outer(torch.arange(a.seq).float(), inv)
        emb = torch.cat((ang, ang), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.mask = torch.full((a.seq, a.seq), float("-inf")).triu(1)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x, self.cos, self.sin, self.mask)
        return self.head(self.norm(x))


def main():
    p = argparse.ArgumentParser()
    for name, default in [("hidden", 512), ("layers", 4), ("heads", 8), ("kv-heads", 4), ("intermediate", 1376),
                          ("vocab", 259), ("batch", 8), ("seq", 128), ("rank", 8), ("steps", 40), ("warmup", 5),
                          ("threads", 2)]:
        p.add_argument("--" + name, type=int, default=default)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Model(a)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    times = []
    for step in range(a.steps):
        ids = torch.randint(0, a.vocab, (a.batch, a.seq))
        t0 = time.perf_counter()
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, a.vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"peer": "plain-pytorch-lora", "torch": torch.__version__, "threads": a.threads,
                      "trainable": sum(q.numel() for q in params), "batch": a.batch, "seq": a.seq,
                      "step_s": round(statistics.median(times[a.warmup:]), 4)}))


if __name__ == "__main__":
    main()
