"""Draw PSNR against MACs saved from quality.py's JSON lines (one PNG, no plotting library).

  python tests/bench/quality.py --seeds 0 1 2 ... > q.jsonl
  python tests/bench/plot_frontier.py q.jsonl [more.jsonl ...] --out docs/frontier.png

Each method (CAT's token pruning, CAT's step reuse, LazyCache) is one colour; filled dots are
mean PSNR, hollow ones the worst image. MACs saved at SD3-medium scale when the lines have it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"CAT token pruning": (31, 119, 180), "CAT step reuse (keep 1.0)": (44, 160, 44),
           "CAT pruning + reuse": (148, 103, 189), "LazyCache": (214, 39, 40)}


def family(line: dict) -> str:
    if line["method"] == "lazycache":
        return "LazyCache"
    if line.get("reuse_threshold", 0) > 0:
        return "CAT step reuse (keep 1.0)" if line["keep_ratio"] >= 1.0 else "CAT pruning + reuse"
    return "CAT token pruning"


def read(paths) -> list[dict]:
    lines = []
    for path in paths:
        for raw in Path(path).read_text().splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if "psnr_mean" in line:
                lines.append(line)
    return lines


def draw(lines, out, key, size=(900, 600), margin=70):
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [line[key] for line in lines]
    ys = [v for line in lines for v in (line["psnr_mean"], line["psnr_min"])]
    x0, x1 = 0.0, 0.1 * (int(max(xs) * 10) + 1)
    y0, y1 = min(ys) - 1, max(ys) + 1

    def at(x, y):
        return margin + (x - x0) / (x1 - x0) * (w - 2 * margin), h - margin - (y - y0) / (y1 - y0) * (h - 2 * margin)

    d.rectangle([margin, margin, w - margin, h - margin], outline="black")
    for i in range(round(x1 * 10) + 1):
        x = i / 10
        px, _ = at(x, y0)
        d.line([px, h - margin, px, h - margin + 5], fill="black")
        d.text((px - 12, h - margin + 8), f"{100 * x:.0f}%", fill="black")
    for i in range(7):
        y = y0 + i * (y1 - y0) / 6
        _, py = at(x0, y)
        d.line([margin - 5, py, margin, py], fill="black")
        d.text((8, py - 6), f"{y:.1f} dB", fill="black")
    d.text((w // 2 - 150, h - 28), f"MACs saved ({'SD3-medium scale' if key.endswith('medium') else 'fixture'})", fill="black")
    d.text((margin, 20), "PSNR against the unpatched image: filled = mean, hollow = worst image", fill="black")
    for name, colour in COLOURS.items():
        points = sorted((line[key], line["psnr_mean"], line["psnr_min"]) for line in lines if family(line) == name)
        if not points:
            continue
        means = [at(x, m) for x, m, _ in points]
        if len(means) > 1:
            d.line(means, fill=colour, width=2)
        for (x, m, worst), (px, py) in zip(points, means):
            d.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
            qx, qy = at(x, worst)
            d.ellipse([qx - 4, qy - 4, qx + 4, qy + 4], outline=colour, width=2)
    for i, (name, colour) in enumerate(n for n in COLOURS.items() if any(family(line) == n[0] for line in lines)):
        d.rectangle([w - margin - 230, margin + 12 + 18 * i, w - margin - 220, margin + 22 + 18 * i], fill=colour)
        d.text((w - margin - 212, margin + 10 + 18 * i), name, fill="black")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    img.save(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", default="bench_out/frontier.png")
    args = p.parse_args()
    lines = [line for line in read(args.inputs) if line.get("macs_saved") is not None]
    key = "macs_saved_sd3_medium" if all("macs_saved_sd3_medium" in line for line in lines) else "macs_saved"
    draw(lines, args.out, key)
    print(json.dumps({"bench": "frontier", "points": len(lines), "out": args.out}))


if __name__ == "__main__":
    main()
