#!/usr/bin/env bash
# Retrain the built-in default model from scratch on the Shapes world (2 CPU cores: about
# 18 min for the autoencoder and 75 min for the UNet when nothing else runs; see README). Re-running resumes.
set -euo pipefail
RUNS="${RUNS:-runs}"
mezzotint train-vae --run-dir "$RUNS/vae" --preset shapes --steps 2000 --batch 24 --lr 8e-4 \
    --warmup 100 --ckpt-every 250 --sample-every 500 --log-every 25 --threads 2
mezzotint train --run-dir "$RUNS/unet" --preset shapes --vae "$RUNS/vae/model" --steps 5000 --batch 64 \
    --lr 6e-4 --warmup 300 --ckpt-every 250 --sample-every 1000 --log-every 25 --threads 2
mezzotint eval --model "$RUNS/unet/model"
echo "to ship it: cp $RUNS/unet/model/{model.json,unet.safetensors,vae.safetensors} src/mezzotint/weights/default/"
