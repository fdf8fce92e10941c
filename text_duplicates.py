"""Exact and near-duplicate texts: normalized text for exact repeats, word-trigram Jaccard similarity through
datasketch's MinHash LSH index for near ones. The dataset report and the synthetic-data filter use the same index, so
a row the report calls a near duplicate is one the filter would drop."""

from __future__ import annotations

import re
from typing import Any

NEAR_DUPLICATE_THRESHOLD = 0.8  # word-trigram Jaccard similarity, as the synthetic-data filter uses
LSH_MARGIN = 0.7  # the index's threshold as a share of the real one: see DuplicateIndex
NUM_PERM = 128  # MinHash permutations: Jaccard estimates within about ±0.09 (1/sqrt(128))


def normalize_text(text: str) -> str:
    """Lower case, punctuation and runs of spaces folded: the form two rows are compared in."""
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def shingles(normalized: str) -> set[str]:
    """Word trigrams of a normalized text (the text itself when it has fewer than three words)."""
    words = normalized.split()
    if len(words) < 3:
        return {normalized}
    return {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}


class DuplicateIndex:
    """Exact duplicates by normalized text; near duplicates through a MinHash LSH index whose candidates are then
    checked by their exact trigram Jaccard similarity, so a hash collision never drops a row."""

    def __init__(self, threshold: float = NEAR_DUPLICATE_THRESHOLD) -> None:
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.exact: dict[str, Any] = {}
        self.shingles: dict[Any, set[str]] = {}
        # The index is tuned below the real threshold: LSH misses some pairs just above its own threshold (a row
        # with Jaccard 0.9 was missed at 0.8), and every candidate is checked exactly anyway. 1 = exact only.
        lsh_threshold = max(0.05, LSH_MARGIN * threshold)
        self.lsh = MinHashLSH(threshold=lsh_threshold, num_perm=NUM_PERM) if threshold < 1 else None

    def find(self, text: str) -> tuple[str, Any] | None:
        """("duplicate" | "near_duplicate", the key of the kept row it repeats), or None when it is new."""
        normalized = normalize_text(text)
        if normalized in self.exact:
            return "duplicate", self.exact[normalized]
        if self.lsh is None:
            return None
        own = shingles(normalized)
        for key in sorted(self.lsh.query(_minhash(own)), key=str):
            other = self.shingles[key]
            if len(own & other) / len(own | other) >= self.threshold:
                return "near_duplicate", key
        return None

    def add(self, key: Any, text: str) -> None:
        normalized = normalize_text(text)
        self.exact.setdefault(normalized, key)
        if self.lsh is not None and key not in self.shingles:
            self.shingles[key] = shingles(normalized)
            self.lsh.insert(key, _minhash(self.shingles[key]))


def _minhash(items: set[str]):
    from datasketch import MinHash

    minhash = MinHash(num_perm=NUM_PERM, seed=1)
    minhash.update_batch([item.encode("utf-8") for item in items])
    return minhash
