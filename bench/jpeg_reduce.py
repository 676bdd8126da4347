"""data.jpeg_reduce on one CPU core: training crops per second of the CPU path (decode, RandomResizedCrop,
resize), with and without the reduced JPEG decode, for photo-like JPEGs of several sizes, and how far
the reduced crops' pixels are from the full decode's (mean absolute difference, 0-255 levels).

    python bench/jpeg_reduce.py --out jpeg_reduce.json
"""

import argparse
import io
import json
import random
import time

import numpy as np
import torch

from vitdist.config import DataConfig
from vitdist.demo_data import draw_photo
from vitdist.samples import load_rgb, open_image
from vitdist.transforms import draw_augmentation, reduce_jpeg, resized_crop


def crops(data: bytes, count: int, size: int, reduce: bool) -> list[torch.Tensor]:
    """The CPU path's crops of one JPEG, drawn from the same seeds whether reduced or not."""
    out, cfg = [], DataConfig()
    for seed in range(count):
        image = open_image(data)
        box, flip = draw_augmentation(random.Random(seed), image.width, image.height, cfg)
        if reduce:
            [box] = reduce_jpeg(image, [box], size)
        out.append(resized_crop(load_rgb(image), box, flip, size))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500x375,1024x768,1600x1200,2048x1536")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--crops", type=int, default=100, help="crops timed per image size, way and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="the two ways alternate; the best rate of each counts")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker's share
    rows = []
    for spec in args.sizes.split(","):
        width, height = map(int, spec.split("x"))
        buffer = io.BytesIO()
        draw_photo(width, height, np.random.default_rng(0)).save(buffer, format="JPEG", quality=90)
        rates, results = {False: 0.0, True: 0.0}, {}
        for _ in range(args.repeats):  # alternating: a machine's speed that drifts meets both ways alike
            for reduce in (False, True):
                start = time.perf_counter()
                results[reduce] = crops(buffer.getvalue(), args.crops, args.img_size, reduce)
                rates[reduce] = max(rates[reduce], args.crops / (time.perf_counter() - start))
        diff = [(a.float() - b.float()).abs().mean().item() for a, b in zip(results[False], results[True])]
        rows.append({"image": spec, "jpeg_kb": round(buffer.tell() / 1024), "img_size": args.img_size,
                     "full_per_s": round(rates[False], 1), "reduced_per_s": round(rates[True], 1),
                     "speedup": round(rates[True] / rates[False], 2),
                     "reduced_share": sum(d > 0 for d in diff) / len(diff), "mean_abs_diff": round(float(np.mean(diff)), 2)})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
