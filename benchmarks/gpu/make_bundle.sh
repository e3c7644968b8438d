#!/usr/bin/env bash
# Pack what benchmarks/gpu/dense_recipes.py needs on a GPU machine without internet or
# ../shared into .gpu/ (about 56 MB; ignored by git): SciFact (corpus gzipped), the mined
# training examples of two labelled builds (teacher BM25 + MiniLM: work/scifact; teacher
# BM25 + MiniLM + int8 mpnet: $M3, a work dir of configs/scifact.toml with that teacher and
# train.dense.teacher_scale = 0.6667), MiniLM (weights as fp16 to fit a 64 MiB transfer; the
# script casts them back to fp32) and wheels of ir-measures / pytrec-eval-terrier for
# Python 3.12. Then, on the GPU machine, from the repo root:
#   pip install --target /tmp/site .gpu/whl/*.whl && PYTHONPATH=/tmp/site python3 .gpu/sweep.py
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${NRS_SHARED_DATA:-../shared/data}/scifact
M3=${M3:?set M3 to the work dir of the three-member-teacher build}
PY=${PY:-.venv/bin/python}
M=$($PY -c "from models.sources import resolve_model; print(resolve_model('packaged:minilm'))")
rm -rf .gpu && mkdir -p .gpu/data/qrels .gpu/m2 .gpu/m3 .gpu/minilm .gpu/whl
cp "$DATA/queries.jsonl" .gpu/data/ && cp "$DATA"/qrels/*.tsv .gpu/data/qrels/
gzip -c "$DATA/corpus.jsonl" > .gpu/data/corpus.jsonl.gz
cp work/scifact/mine/examples.pkl .gpu/m2/mine.pkl && cp work/scifact/pseudo-1000/examples.pkl .gpu/m2/pseudo.pkl
cp "$M3/mine/examples.pkl" .gpu/m3/mine.pkl && cp "$M3/pseudo-1000/examples.pkl" .gpu/m3/pseudo.pkl
for f in 1_Pooling config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt modules.json \
         sentence_bert_config.json config_sentence_transformers.json; do cp -r "$M/$f" .gpu/minilm/; done
$PY - "$M" <<'PY'
import sys
import torch
from safetensors.torch import load_file, save_file
sd = load_file(f"{sys.argv[1]}/model.safetensors")
save_file({k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
          ".gpu/minilm/model.fp16.safetensors", metadata={"format": "pt"})
PY
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl ir-measures==0.4.3 pytrec-eval-terrier==0.5.11
cp benchmarks/gpu/dense_recipes.py .gpu/sweep.py
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
du -sh .gpu
