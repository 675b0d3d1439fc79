"""Checks that an adapter exported by `amaq export` loads in Python PEFT on the original checkpoint
and gives the logits amaq computes with it. Run on the GPU machine (transformers + peft), e.g. by
tools/ref/gpu_checks.sh. Prints one JSON line; exits 1 when a check fails.

  python3 tools/ref/check_peft_export.py --model HF_DIR --adapter EXPORTED_DIR --amaq build/amaq --work TMP
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def amaq_logits(amaq, model, adapter, ids_path, out_path, split):
    cmd = [amaq, "forward", "--model", model, "--adapter", adapter, "--ids", ids_path, "--out", out_path]
    if split:
        cmd += ["--split", str(split)]
    subprocess.run(cmd, check=True)
    return load_file(out_path)["logits"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--amaq", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args()

    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, 24), dtype=torch.int64)
    ids_path = os.path.join(a.work, "ids.safetensors")
    save_file({"input_ids": ids}, ids_path)

    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(base, a.adapter).eval()

    # Every tensor of the file must have landed in a LoRA parameter of the model, unchanged.
    saved = load_file(os.path.join(a.adapter, "adapter_model.safetensors"))
    params = dict(peft_model.named_parameters())
    missing, differ = [], []
    for key, value in saved.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        if name not in params:
            missing.append(key)
        elif not torch.equal(params[name].detach().cpu(), value):
            differ.append(key)
    lora_params = [n for n in params if ".lora_" in n]

    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
    result = {
        "tensors_in_file": len(saved),
        "lora_params_in_model": len(lora_params),
        "missing": missing[:5],
        "differ": differ[:5],
        "adapter_effect_max_abs": float((peft_logits - base_logits).abs().max()),
    }
    ok = not missing and not differ and len(lora_params) == len(saved) and result["adapter_effect_max_abs"] > 1e-3
    for split in (0, 2):
        ours = amaq_logits(a.amaq, a.model, a.adapter, ids_path, os.path.join(a.work, f"out{split}.safetensors"), split)
        diff = float((ours - peft_logits).abs().max())
        result[f"max_abs_diff_split{split}"] = diff
        ok = ok and diff < 1e-4
    result["ok"] = ok
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
