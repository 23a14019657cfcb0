"""The rectification rule, on plain arrays (no models): intended labels + the ensemble's probabilities -> records.

For every record, each ensemble member votes for its most probable class (probabilities already in the set's
label space). Then:

    agreement = share of members voting for the intended label                        (in [0, 1])
    majority agrees (agreement > 1/2)   -> the hard intended label is kept             label_source "intended"
    otherwise                           -> label_soft = (w x one-hot(intended) + sum of the members'
                                           probabilities) / (w + members)                     "ensemble"
                                           (w = labeling.intended_weight: 0 replaces the intended label by the
                                           ensemble's mean; 1 counts the generator's intention as one more vote,
                                           which softens the label instead of overwriting it)
    min_confidence set and max(mean probabilities) < min_confidence -> the record is dropped

The confidence is the ensemble's (the max of the mean distribution), for agreeing records too: a face the
ensemble barely recognises is dropped whatever the vote. `label` stays the intended label (the format's meaning:
the label the image was generated for); `label_rectified` is the argmax of the label the record trains on.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

INTENDED, ENSEMBLE = "intended", "ensemble"


def normalize(probs: np.ndarray) -> np.ndarray:
    """Rows renormalised to sum to 1 (float64): JSON round trips and remapping leave tiny drifts."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError(f"ensemble probabilities: expected a (members, classes) array of finite non-negative "
                         f"numbers, got shape {probs.shape}")
    total = probs.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise ValueError("ensemble probabilities: a member gives zero mass to every class of the set")
    return probs / total


def decide(intended: int, probs: np.ndarray, min_confidence: Optional[float] = None,
           intended_weight: float = 0.0) -> dict[str, Any]:
    """The rule for one record. `probs`: (members, classes). Returns the fields the new record gets."""
    probs = normalize(probs)
    votes = probs.argmax(axis=1)
    agreement = float((votes == intended).mean())
    mean = probs.mean(axis=0)
    mean = mean / mean.sum()
    confidence = float(mean.max())
    out: dict[str, Any] = {"agreement": agreement, "confidence": confidence,
                           "dropped": min_confidence is not None and confidence < min_confidence}
    if agreement > 0.5:
        out.update(label_source=INTENDED, label_soft=None, label_rectified=int(intended))
    else:
        soft = probs.sum(axis=0)
        soft[intended] += intended_weight
        soft = soft / soft.sum()
        out.update(label_source=ENSEMBLE, label_soft=[float(p) for p in soft], label_rectified=int(soft.argmax()))
    return out


def rectify(records: Sequence[Mapping], probs_by_id: Mapping[str, np.ndarray], label_names: Sequence[str], *,
            min_confidence: Optional[float] = None, mode: str = "rectify",
            bad_ids: Sequence[str] = (), intended_weight: float = 0.0) -> tuple[list[dict], dict[str, Any]]:
    """New manifest records and the summary. mode="none" keeps every intended label (the "no labeler" row).

    Records in `bad_ids` (images that could not be decoded) are left out of the new version and counted.
    """
    if mode not in ("rectify", "none"):
        raise ValueError(f"labeling.mode={mode!r}: expected rectify or none")
    k = len(label_names)
    bad = set(bad_ids)
    confusion = np.zeros((k, k), dtype=np.int64)
    per_class = {name: {"count": 0, "agreed": 0, "changed": 0, "dropped": 0, "soft": 0} for name in label_names}
    new: list[dict] = []
    counts = {"num_changed": 0, "num_dropped": 0, "num_soft": 0, "num_agreed": 0, "num_bad": 0}
    agreements: list[float] = []
    for rec in records:
        intended = int(rec["label"])
        row = per_class[label_names[intended]]
        if rec["id"] in bad:
            counts["num_bad"] += 1
            continue
        row["count"] += 1
        out = {k_: v for k_, v in rec.items() if k_ not in ("label_soft", "agreement", "confidence")}
        if mode == "none":
            out.update(label_source=INTENDED, label_rectified=intended)
            confusion[intended, intended] += 1
            new.append(out)
            continue
        if rec["id"] not in probs_by_id:
            raise ValueError(f"record {rec['id']!r}: no ensemble prediction (the labelling run is incomplete)")
        d = decide(intended, probs_by_id[rec["id"]], min_confidence, intended_weight)
        agreements.append(d["agreement"])
        if d["agreement"] > 0.5:
            counts["num_agreed"] += 1
            row["agreed"] += 1
        if d["dropped"]:
            counts["num_dropped"] += 1
            row["dropped"] += 1
            continue
        if d["label_source"] == ENSEMBLE:
            counts["num_soft"] += 1
            row["soft"] += 1
            out["label_soft"] = d["label_soft"]
        if d["label_rectified"] != intended:
            counts["num_changed"] += 1
            row["changed"] += 1
        out.update(label_source=d["label_source"], agreement=d["agreement"],
                   confidence=round(d["confidence"], 6), label_rectified=d["label_rectified"])
        confusion[intended, d["label_rectified"]] += 1
        new.append(out)
    labelled = len(records) - counts["num_bad"]
    for row in per_class.values():
        row["agreement_rate"] = row["agreed"] / row["count"] if row["count"] and mode != "none" else None
    summary = {
        "mode": mode, "num_records": len(records), "num_kept": len(new), **counts,
        "agreement_rate": counts["num_agreed"] / labelled if labelled and mode != "none" else None,
        "mean_agreement": float(np.mean(agreements)) if agreements else None,
        "min_confidence": min_confidence, "intended_weight": intended_weight, "per_class": per_class, "label_names": list(label_names),
        "confusion": confusion.tolist(),  # rows: intended, columns: rectified (kept records)
    }
    return new, summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """A small Markdown table for the console."""
    def pct(x: Optional[float]) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"

    lines = [f"records {summary['num_records']}, kept {summary['num_kept']}, changed {summary['num_changed']}, "
             f"soft {summary['num_soft']}, dropped {summary['num_dropped']}, undecodable {summary['num_bad']}, "
             f"agreement {pct(summary['agreement_rate'])}%",
             "| class | records | agreement % | changed | soft | dropped |", "|---|---|---|---|---|---|"]
    for name, row in summary["per_class"].items():
        lines.append(f"| {name} | {row['count']} | {pct(row['agreement_rate'])} | {row['changed']} | {row['soft']} | "
                     f"{row['dropped']} |")
    return "\n".join(lines)
