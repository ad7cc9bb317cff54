"""Disk cache over diskcache. Values are bytes only (JSON text or safetensors), never pickled objects:
a corrupt, truncated or foreign entry fails to decode, is dropped and recomputed — it is never executed.

Keys read ``<kind>/<model fingerprint>/<scope>/<sha256 of sorted JSON>``, so one model's or one task's
entries can be listed by prefix (the dashboard's Results page does).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import ALGO_VERSION, canonical_json, stable_hash

log = logging.getLogger(__name__)
_MAGIC_JSON = b"LLJ1"
_MAGIC_TENSORS = b"LLT1"


FACTORS = "factors"  # the key kind of block-SVD factors: a speed-up, recomputed when dropped


class Store:
    """Typed get/put of JSON documents and tensor dicts, with hit/miss/compute counters.

    Two diskcaches in one folder. Results, reports and scores (what a user compares and exports) are never
    evicted. Block-SVD factors, which a large model makes by the gigabyte and a search recomputes when missing, go
    to ``<directory>/factors``, bounded by ``size_limit`` and dropped least recently used first. In one bounded
    cache dropping what was stored first, about five default searches on a 1B-parameter model (some 1.6 GB of
    factors each, by their shapes) would have pushed out the first search's results.

    When the folder cannot be created or written (read-only, disk full), the store disables itself,
    records why in ``disabled_reason``, and every call becomes a miss: runs continue without caching.
    """

    def __init__(self, directory: str | Path | None = None, size_limit: int = 8 * 2**30) -> None:
        from .models import cache_root

        self.directory = Path(directory) if directory else cache_root() / "store"
        self.counts: Counter = Counter()
        self.disabled_reason: str | None = None
        self._cache = self._factors = None
        try:
            import diskcache

            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
            self._cache = diskcache.Cache(str(self.directory))
            if self._cache.eviction_policy != "none":  # new, or written before the split: it evicted
                self._drop_old_factors()
            self._factors = diskcache.Cache(str(self.directory / FACTORS), size_limit=size_limit, cull_limit=1,
                                            eviction_policy="least-recently-used")  # one entry out per entry in
        except Exception as e:  # noqa: BLE001 - any failure here means "run without a cache"
            self._disable(f"cache folder {self.directory} is not usable ({type(e).__name__}: {e}); running without a cache")

    def _drop_old_factors(self) -> None:
        """Once per folder: drop the factors that a store before the split kept beside the results (they are
        recomputed on use), and switch that cache's eviction off (diskcache keeps the setting in the folder)."""
        for key in [k for k in self._cache.iterkeys() if isinstance(k, str) and k.startswith(FACTORS + "/")]:
            self._cache.delete(key)
        self._cache.reset("eviction_policy", "none")

    def _disable(self, why: str) -> None:
        if self.disabled_reason is None:
            log.warning(why)
        self.disabled_reason = why
        self._cache = self._factors = None

    @property
    def enabled(self) -> bool:
        return self._cache is not None

    def _of(self, key: str):
        return self._factors if key.startswith(FACTORS + "/") else self._cache

    @staticmethod
    def key(kind: str, model: str, scope: str, ident: Any) -> str:
        """Cache key for ``kind`` (e.g. "spectra"), model fingerprint, scope (task digest or "-") and identity."""
        return f"{kind}/{model}/{scope}/{stable_hash({'v': ALGO_VERSION, 'id': ident}, 32)}"

    def _get(self, key: str) -> bytes | None:
        if not self.enabled:
            return None
        try:
            raw = self._of(key).get(key)
        except Exception as e:  # noqa: BLE001 - sqlite errors, unreadable files
            self._disable(f"cache read failed ({e}); running without a cache")
            return None
        return raw if isinstance(raw, bytes) else (None if raw is None else b"")

    def _put(self, key: str, raw: bytes) -> None:
        if not self.enabled:
            return
        try:
            self._of(key).set(key, raw)
        except Exception as e:  # noqa: BLE001 - disk full, read-only
            self._disable(f"cache write failed ({type(e).__name__}: {e}); running without a cache")

    def _drop(self, key: str, why: str) -> None:
        log.warning("cache entry %s is unusable (%s): recomputing", key, why)
        self.counts["corrupt"] += 1
        try:
            self._of(key).delete(key)
        except Exception:  # noqa: BLE001
            pass

    def get_json(self, key: str) -> Any | None:
        raw = self._get(key)
        if raw is None:
            self.counts["miss"] += 1
            return None
        try:
            if not raw.startswith(_MAGIC_JSON):
                raise ValueError("not a LASER Lab JSON entry")
            doc = json.loads(raw[len(_MAGIC_JSON):].decode())
            if doc.get("v") != ALGO_VERSION:
                raise ValueError(f"written by algorithm version {doc.get('v')}")
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            self._drop(key, str(e))
            self.counts["miss"] += 1
            return None
        self.counts["hit"] += 1
        return doc["data"]

    def put_json(self, key: str, data: Any) -> None:
        self._put(key, _MAGIC_JSON + canonical_json({"v": ALGO_VERSION, "data": data}).encode())

    def get_tensors(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load

        raw = self._get(key)
        if raw is None:
            self.counts["miss"] += 1
            return None
        try:
            if not raw.startswith(_MAGIC_TENSORS):
                raise ValueError("not a LASER Lab tensor entry")
            out = load(raw[len(_MAGIC_TENSORS):])
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on garbage
            self._drop(key, str(e)[:100])
            self.counts["miss"] += 1
            return None
        self.counts["hit"] += 1
        return out

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        self._put(key, _MAGIC_TENSORS + save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))

    def cached_json(self, key: str, compute: Callable[[], Any]) -> Any:
        """Return the cached document at ``key`` or compute, store and return it (counted as "compute")."""
        doc = self.get_json(key)
        if doc is None:
            self.counts["compute"] += 1
            doc = compute()
            self.put_json(key, doc)
        return doc

    def iter_json(self, prefix: str) -> Iterator[tuple[str, Any]]:
        """All decodable JSON entries whose key starts with ``prefix``."""
        if not self.enabled:
            return
        for key in list(self._cache.iterkeys()):
            if isinstance(key, str) and key.startswith(prefix):
                doc = self.get_json(key)
                if doc is not None:
                    yield key, doc

    def delete(self, key: str) -> bool:
        """Remove the entry at ``key``; False where there was none (or the store is disabled)."""
        if not self.enabled:
            return False
        try:
            return bool(self._of(key).delete(key))
        except Exception as e:  # noqa: BLE001 - sqlite errors, read-only folder
            self._disable(f"cache write failed ({type(e).__name__}: {e}); running without a cache")
            return False

    def clear(self) -> None:
        if self.enabled:
            self._cache.clear()
            self._factors.clear()

    def close(self) -> None:
        for cache in (self._cache, self._factors):
            if cache is not None:
                cache.close()


def null_store() -> Store:
    """A store that caches nothing (for tests and ``--no-cache``)."""
    s = Store.__new__(Store)
    s.directory, s.counts, s.disabled_reason, s._cache, s._factors = None, Counter(), "caching switched off", None, None
    return s
