#!/usr/bin/env bash
# Retrain the built-in default model from scratch on the Shapes world (2 idle CPU cores:
# about 18 min for the autoencoder, 8 to encode the UNet's pool once, about 40, 50, 85 and 90 min
# for the four UNet stages, 15 for the decoder: about 5 h 30 min; see README). Re-running resumes.
set -euo pipefail
RUNS="${RUNS:-runs}"
mezzotint train-vae --run-dir "$RUNS/vae" --preset shapes --steps 2000 --batch 24 --lr 8e-4 \
    --warmup 100 --ckpt-every 250 --sample-every 500 --log-every 25 --threads 2
mezzotint train --run-dir "$RUNS/unet" --preset shapes --vae "$RUNS/vae/model" --steps 6500 --batch 64 \
    --lr 6e-4 --warmup 300 --pool 80000 --ckpt-every 250 --sample-every 1000 --log-every 25 --threads 2
# a second UNet stage: a fresh warm-up and cosine from the first stage's weights (the shipped
# model was made in stages because each had to fit in one working session); same pool
mkdir -p "$RUNS/unet-more" && ln -sfn ../unet/pool "$RUNS/unet-more/pool"
mezzotint train --run-dir "$RUNS/unet-more" --init "$RUNS/unet/model" --steps 9000 --batch 64 \
    --lr 3e-4 --warmup 200 --pool 80000 --ckpt-every 250 --sample-every 2000 --log-every 25 --threads 2
mezzotint train-vae --run-dir "$RUNS/vae-dec" --init "$RUNS/vae/model" --decoder-only --steps 2000 --batch 24 \
    --lr 3e-4 --warmup 50 --ckpt-every 250 --sample-every 1000 --log-every 25 --threads 2
cp "$RUNS/vae-dec/model/vae.safetensors" "$RUNS/unet-more/model/vae.safetensors"  # same latent space
# a third stage grows the UNet: transformers at the 16x16 level too, whose output projections
# start at zero (the grown model computes what stage 2's did), then 11000 more steps; same pool
mkdir -p "$RUNS/unet-grown" && ln -sfn ../unet/pool "$RUNS/unet-grown/pool"
mezzotint train --run-dir "$RUNS/unet-grown" --init "$RUNS/unet-more/model" --attention-levels 0,1,2 \
    --steps 11000 --batch 64 --lr 3e-4 --warmup 200 --pool 80000 --ckpt-every 250 --sample-every 2000 \
    --log-every 25 --threads 2
# a fourth stage adds the grounding loss (each colour/shape/size word's cross-attention is
# pushed into its object's mask): it targets colours bound to the wrong shape; same pool
mkdir -p "$RUNS/unet-grounded" && ln -sfn ../unet/pool "$RUNS/unet-grounded/pool"
mezzotint train --run-dir "$RUNS/unet-grounded" --init "$RUNS/unet-grown/model" --attention-loss 1e-3 \
    --steps 6000 --batch 64 --lr 2e-4 --warmup 200 --pool 80000 --ckpt-every 250 --sample-every 3000 \
    --log-every 25 --threads 2
# set the default guidance scale to 3 (chosen with --prompt-seed 1) before the last stage copies the config
python - "$RUNS/unet-grounded/model/model.json" <<'PY'
import json, sys
p = sys.argv[1]; d = json.load(open(p)); d["config"]["defaults"]["cfg"] = 3.0; json.dump(d, open(p, "w"), indent=1)
PY
# last, the layout map (text only, no UNet training; a few minutes): layout guidance on at strength 3,
# the best of 8 initial noises for prompts whose objects the map puts apart
mezzotint fit-layout --model "$RUNS/unet-grounded/model" --output "$RUNS/default" --steps 5000 --items 40000 \
    --frequencies 8 --heads 4 --strength 3 --start 400 --candidates 8
mezzotint eval --model "$RUNS/default"
echo "to ship it: cp $RUNS/default/{model.json,unet.safetensors,vae.safetensors} src/mezzotint/weights/default/"
