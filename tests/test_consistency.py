"""The small helpers pasted into several scripts (parse_overrides, atomic_save, read_shard, ...) are
copies by design, so each file stays standalone; this test keeps the copies identical."""
import ast
import functools
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train_grokking.py", "train_muon.py", "train_ngpt.py", "prepare_fineweb.py", "bench.py", "study_lm.py",
           "study_grokking.py", "study_ngpt.py"]
PASTED = ["parse_overrides", "atomic_save", "atomic_write_json", "load_checkpoint", "rng_state", "set_rng_state",
          "source_hash", "read_shard", "SHARD_MAGIC", "settings_help", "data_fingerprint", "run_identity",
          "identity_diff", "build_vocab_map", "parse_grid", "bootstrap_ci"]


@functools.lru_cache(maxsize=None)
def top_level(path):
    """{name: source} of the module's top-level functions and constant assignments."""
    with open(path) as f:
        text = f.read()
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for name in ([t] if isinstance(t, ast.Name) else getattr(t, "elts", [])):
                    if isinstance(name, ast.Name):
                        out[name.id] = ast.get_source_segment(text, node)
    return out


@pytest.mark.parametrize("name", PASTED)
def test_pasted_helpers_are_identical(name):
    copies = {s: top_level(os.path.join(ROOT, s)).get(name) for s in SCRIPTS}
    copies = {s: src for s, src in copies.items() if src is not None}
    assert copies, f"{name} is pasted nowhere: remove it from PASTED"
    first = next(iter(copies.values()))
    differ = [s for s, src in copies.items() if src != first]
    assert not differ, f"{name} differs between {sorted(copies)}: {differ} drifted; paste one version into all"
