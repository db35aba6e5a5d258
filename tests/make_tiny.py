"""Write a tiny random LLaVA checkpoint and a photo, for trying the command line as a user would
(`.ci/run` runs the README's main path on them in an environment without the test extras).

    python tests/make_tiny.py CHECKPOINT_DIR PHOTO.png [--layout llava-hf|original] [--version 1.5|1.6]
        [--llm llama|mistral|llama3|phi3|qwen2] [--tower clip|siglip] [--version onevision]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import build_checkpoint, build_family_checkpoint  # noqa: E402
from onevision_checkpoints import build_onevision_checkpoint  # noqa: E402
from siglip_checkpoints import siglip_vision_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("photo", type=Path)
    parser.add_argument("--layout", default="llava-hf", choices=["llava-hf", "original"])
    parser.add_argument("--version", default="1.5", choices=["1.5", "1.6", "onevision"],
                        help="onevision: a LLaVA-OneVision checkpoint (SigLIP tower, Qwen2 LLM)")
    parser.add_argument("--tower", default="clip", choices=["clip", "siglip"],
                        help="siglip (with --llm qwen2): llava-interleave's shape")
    parser.add_argument("--llm", default="llama", choices=["llama", "mistral", "llama3", "phi3", "qwen2"],
                        help="llama3, phi3 and qwen2: a llava-hf checkpoint of that LLM, with its chat template")
    args = parser.parse_args()
    work = args.checkpoint.parent / f".{args.checkpoint.name}-build"
    if args.version == "onevision":
        ckpt = build_onevision_checkpoint(work)
    elif args.llm in ("llama3", "phi3", "qwen2"):
        siglip = dict(vision=siglip_vision_config(), vision_feature_select_strategy="full",
                      vision_feature_layer=-1) if args.tower == "siglip" else {}
        ckpt = build_family_checkpoint(work, family=args.llm, llava_version=args.version, **siglip)
    else:
        ckpt = build_checkpoint(work, llava_version=args.version, layout=args.layout, llm=args.llm)
    if args.checkpoint.exists():
        shutil.rmtree(args.checkpoint)
    shutil.move(str(ckpt.path), args.checkpoint)
    if getattr(ckpt, "clip_path", None) is not None:  # the original layout names its CLIP repo by path
        raise SystemExit("only llava-hf checkpoints are self-contained; use --layout llava-hf")
    shutil.rmtree(work)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize((320, 240)).save(args.photo)


if __name__ == "__main__":
    main()
