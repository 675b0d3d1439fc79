"""Writes train.txt: 4000 lines of 40 words drawn (seed 1) from 100 common English words, so that
every 128-byte window of the byte tokenizer is full and no batch is padded. The benchmarks'
training data (tools/cpu_step_bench.sh, tools/wan/measure.sh)."""
import random
import sys

random.seed(1)
words = ("the of and to in is was that for it with as his on be at by had are but from or have an they which one "
         "you were her all she there would their we him been has when who will more no if out so said what up its").split()
with open(sys.argv[1] if len(sys.argv) > 1 else "train.txt", "w") as f:
    for _ in range(4000):
        f.write(" ".join(random.choice(words) for _ in range(40)) + "\n")
