"""The lines a person reads at the end of a prepare run, from its report (report.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pixart_tune.base import REPORT


def summary(report: dict[str, Any], out: str, limit: int = 20) -> str:
    """The few lines a person reads at the end of a run."""
    counts = report["counts"]
    rate = f", {report['images_per_second']:g} images/s" if report.get("images_per_second") else ""
    lines = [f"prepared {counts['accepted']} of {counts['seen']} images into {out} (resolution {report['resolution']}) in {report['seconds']:g} s{rate}"]
    if report["skipped"]:
        lines.append(f"skipped {len(report['skipped'])}:")
        lines += [f"  {s['source']}: {s['reason']}" for s in report["skipped"][:limit]]
        if len(report["skipped"]) > limit:
            lines.append(f"  ... and {len(report['skipped']) - limit} more (see report.json)")
    if report.get("unread"):
        lines.append(f"could not read {len(report['unread'])} other files (not used):")
        lines += [f"  {s['source']}: {s['reason']}" for s in report["unread"][:limit]]
        if len(report["unread"]) > limit:
            lines.append(f"  ... and {len(report['unread']) - limit} more (see report.json)")
    if report.get("ignored"):
        lines.append(f"ignored {len(report['ignored'])} files:")
        lines += [f"  {s['source']}: {s['reason']}" for s in report["ignored"][:limit]]
        if len(report["ignored"]) > limit:
            lines.append(f"  ... and {len(report['ignored']) - limit} more (see report.json)")
    if report["duplicates"]:
        kept = "all copies kept" if report["config"]["keep_duplicates"] else "first copy kept"
        lines.append(f"exact duplicates {len(report['duplicates'])} ({kept}):")
        lines += [f"  {b} = {a}" for a, b in report["duplicates"][:limit]]
    if report["overlong_captions"]:
        lines.append(f"captions over {report['overlong_captions'][0]['limit']} T5 tokens (truncated when encoded; shorten them): {len(report['overlong_captions'])}")
        lines += [
            f"  {o['source']}: {o['tokens']} tokens" + (f" (caption {o['variant'] + 1} of {o['variants']})" if "variant" in o else "")
            for o in report["overlong_captions"][:limit]
        ]
    if report["buckets"]:
        lines.append("images per bucket (height x width): " + ", ".join(f"{b}: {n}" for b, n in report["buckets"].items()))
    lines.append("captions from: " + (", ".join(f"{k} {v}" for k, v in report["caption_sources"].items()) or "-"))
    if report["caption_sources"].get("none"):
        lines.append(f"  {report['caption_sources']['none']} images have no caption (only trigger/prefix/suffix); add .txt files or --captioner")
    if report["config"].get("caption_variants"):
        lines.append(f"caption variants: {counts['images_with_variants']} images have several captions; {counts['captions']} captions in all")
    elif counts.get("images_with_unused_variants"):
        lines.append(
            f"  {counts['images_with_unused_variants']} images have several captions (sidecar lines joined into one, or the first "
            "of a metadata list taken); --caption-variants trains on each of them in turn"
        )
    lines += _mask_lines(report, limit)
    lines.append(
        f"cache: {counts['latents_encoded']} latents encoded, {counts['latents_reused']} reused; "
        f"{counts['texts_encoded']} captions encoded, {counts['texts_reused']} reused; "
        f"{counts.get('images_decoded', 0)} images decoded; models loaded: {', '.join(report.get('models_loaded') or ['none'])}"
    )
    if counts.get("cache_entries_repaired"):
        lines.append(f"  {counts['cache_entries_repaired']} damaged cache entries were encoded again")
    lines.append(f"report: {Path(out) / REPORT}")
    return "\n".join(lines)


def _mask_lines(report: dict[str, Any], limit: int) -> list[str]:
    """The summary's word on loss masks: how many images have one, and which ones train nothing inside theirs."""
    config, counts = report["config"], report["counts"]
    if not (report.get("masks") or config.get("mask_from_alpha") or config.get("mask_column")):
        return []
    lines = [f"masks: {report['masks']} of {counts['accepted']} images have masks ({counts['masks_encoded']} encoded, {counts['masks_reused']} reused)"]
    empty = report.get("empty_masks") or []
    if empty:
        lines.append(f"  {len(empty)} masks are black over the whole crop: those images train nothing inside them (only the trainer's mask_floor weight); whiten what should train")
        lines += [f"  {source}" for source in empty[:limit]]
    return lines
