"""The public API: the names the issues promise, loaded lazily."""

import subprocess
import sys

import einfuse

PROMISED = [
    "parse",
    "load",
    "interpret",
    "pass_counts",
    "run_passes",
    "jit",
    "autotune",
    "Schedule",
    "emit_jax",
    "inspect_hlo",
    "estimate",
    "get_target",
    "tuned_pipeline",
    "export_best",
    "import_best",
]


def test_every_promised_name_resolves():
    for name in PROMISED:
        assert getattr(einfuse, name) is not None, name
    assert callable(einfuse.jit) and callable(einfuse.autotune)


def test_autotune_is_both_a_function_and_a_package():
    import einfuse.autotune.timing as timing

    assert callable(einfuse.autotune)
    assert einfuse.autotune.timing is timing


def test_importing_einfuse_loads_neither_jax_nor_optuna():
    code = "import sys, einfuse; print('jax' in sys.modules, 'optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
