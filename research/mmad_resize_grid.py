"""How often does MMAD's two-step resize land on another token grid than one resize would?

The official MMAD Qwen2.5-VL script resizes every image twice: qwen_vl_utils' `fetch_image` rounds it
to the multiples of 28 nearest its size (within 4 to 16384 tokens), then the processor resizes that to
the MMAD limits (64 to 1280 tokens). `iadgpt.evaluation.mmad.official_image` does the first step, so
our grids are the official ones. This probe counts, over a range of image sizes, the sizes where
resizing the original once (with the processor only) would give another grid, and prints examples.

    python research/mmad_resize_grid.py                      # heights 200-3000 px, aspect 1, 4:3, 3:2
    python research/mmad_resize_grid.py --smallest 100 --largest 1200 --aspects 1 2
"""

from __future__ import annotations

import argparse
import json

from iadgpt.data.tasks import ResizeRule
from iadgpt.evaluation.mmad import MMAD_MAX_PIXELS, MMAD_MIN_PIXELS, qwen_vl_utils_rule

FACTOR = 28


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smallest", type=int, default=200, help="smallest image height in pixels")
    parser.add_argument("--largest", type=int, default=3000, help="largest image height in pixels")
    parser.add_argument("--aspects", type=float, nargs="+", default=[1.0, 4 / 3, 1.5], help="width / height ratios")
    parser.add_argument("--examples", type=int, default=5, help="how many differing sizes to print")
    args = parser.parse_args(argv)

    qwen_vl_utils = qwen_vl_utils_rule(FACTOR)
    processor = ResizeRule(FACTOR, MMAD_MIN_PIXELS, MMAD_MAX_PIXELS)
    sizes = differing = 0
    examples = []
    for height in range(args.smallest, args.largest + 1):
        for aspect in args.aspects:
            width = int(height * aspect)
            official = processor.size(*qwen_vl_utils.size(width, height))
            once = processor.size(width, height)
            sizes += 1
            if official != once:
                differing += 1
                if len(examples) < args.examples:
                    examples.append({"image": [width, height], "official_tokens": [s // FACTOR for s in official],
                                     "resized_once_tokens": [s // FACTOR for s in once]})
    for example in examples:
        print(json.dumps(example))
    result = {"probe": "mmad_resize_grid", "sizes": sizes, "other_grid_if_resized_once": differing,
              "fraction": round(differing / sizes, 4)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
