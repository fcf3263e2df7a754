"""DeLVM on device (issue 17): export a DeLVM run (default: the shipped tiny one) at fp32 and int8 weight-only, then
generate every held-out sentence of every task in the ExecuTorch runtime (LM decoder + VQ encoder/decoder .pte) and
compare with torch's greedy generation: token agreement, PSNR of the generated image vs the true target, image
tokens/s and time per image (median).

    OMP_NUM_THREADS=1 python benchmarks/delvm_export.py                  # results/delvm_export.json
    OMP_NUM_THREADS=1 python benchmarks/delvm_export.py --targets executorch,onnx,tflite,coreml   # (first precision)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from effai.cli.delvm import DelvmArtifact, export_delvm, run_paths  # noqa: E402
from effai.data import visual_sentences as vs  # noqa: E402
from effai.files import atomic_write  # noqa: E402
from effai.train.delvm.loop import encoder_fn, eval_sentences, greedy_image, load_lm  # noqa: E402
from effai.zoo import vq as zvq  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="delvm_tiny")
    ap.add_argument("--precisions", default="fp32,int8-weight,int4-weight")
    ap.add_argument("--targets", default="executorch")
    ap.add_argument("--eval-images", type=int, default=9)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "delvm_export.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    vq_file, lm_dir = run_paths(a.run)
    vq, lm = zvq.load(vq_file), load_lm(lm_dir)
    bank = vs.build_bank(vs.source_images("eval", a.eval_images, vq.config.size, 0), encoder_fn(vq), a.eval_images, 1,
                         augment=False)
    n = vq.config.tokens
    result = {"run": a.run, "eval_sentences_per_task": a.eval_images - 1, "precisions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for j, prec in enumerate(a.precisions.split(",")):   # the tokenizer's targets: all for the first precision
            art_dir = Path(tmp) / prec
            spec = export_delvm(Path(a.run) if a.run != "delvm_tiny" else a.run, art_dir, prec,
                                tuple(a.targets.split(",")) if j == 0 else ("executorch",))
            art = DelvmArtifact(art_dir)
            per_task, agree, tok_s, per_image = {}, [], [], []
            for task in vs.TASKS:
                rows, target = eval_sentences(bank, task)
                ref = greedy_image(lm, torch.from_numpy(rows[:, :-n]), n).numpy()
                psnrs = []
                for i in range(len(rows)):
                    imgs = bank.images[task]
                    img, st = art.generate(imgs[i, 0], imgs[i, 1], imgs[i + 1, 0])
                    agree.append(float(np.mean(np.asarray(st["codes"]) == ref[i])))
                    tok_s.append(st["image_tokens_per_s"])
                    per_image.append(st["time_per_image_s"] * 1e3)
                    psnrs.append(float(zvq.psnr(torch.from_numpy(img)[None], torch.from_numpy(target[i])[None])))
                per_task[task] = round(statistics.mean(psnrs), 3)
            result["precisions"][prec] = {
                "psnr_by_task": per_task, "token_agreement_with_torch_fp32": round(statistics.mean(agree), 4),
                "image_tokens_per_s_median": round(statistics.median(tok_s), 1),
                "ms_per_image_median": round(statistics.median(per_image), 2),
                "decoder_bytes": (art_dir / "lm" / "decoder.pte").stat().st_size,
                "lm_parity_identical": spec["lm_parity"]["identical"], "tokenizer_parts": spec["parts"]}
            print(prec, json.dumps({k: v for k, v in result["precisions"][prec].items() if k != "tokenizer_parts"}),
                  flush=True)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(a.results), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
