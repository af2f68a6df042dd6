import os
import subprocess
import sys
from pathlib import Path

from cifarjax.xla_flags import CPU_FLAGS, add_cpu_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_cpu_flags_are_added_once_and_never_replace_the_users():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert add_cpu_flags(environ, "0.10.2") == [f"{FLAG}={CPU_FLAGS[FLAG[2:]]}"]
    assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", f"{FLAG}={CPU_FLAGS[FLAG[2:]]}"]
    assert add_cpu_flags(environ, "0.10.2") == [] and len(environ["XLA_FLAGS"].split()) == 2
    users = {"XLA_FLAGS": f"{FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    assert add_cpu_flags(users, "0.10.2") == [] and users == {"XLA_FLAGS": f"{FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    empty = {}
    assert add_cpu_flags(empty, "0.10.2") and empty["XLA_FLAGS"].startswith(FLAG)


def test_cpu_flags_are_left_out_on_jaxlib_versions_they_were_not_measured_on():
    """An XLA that does not know a flag in XLA_FLAGS aborts the process: only the measured versions get them."""
    environ = {}
    assert add_cpu_flags(environ, "0.11.0") == [] and environ == {}


def test_importing_cifarjax_gives_convolutions_to_xla_not_ynnpack():
    """In a fresh process without XLA_FLAGS, importing cifarjax before JAX starts makes the stem's convolution
    XLA's own; without cifarjax the same program runs it in a YNNPACK fusion."""
    program = ("import jax, jax.numpy as jnp\n"
               "f = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), [(3, 3)] * 2,"
               " dimension_numbers=('NHWC', 'HWIO', 'NHWC')))\n"
               "text = f.lower(jnp.ones((8, 32, 32, 3)), jnp.ones((7, 7, 3, 64))).compile().as_text()\n"
               "print('ynnpack' if 'ynn_fusion' in text else 'xla')\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = Path(__file__).resolve().parents[1]
    runs = [subprocess.run([sys.executable, "-c", prefix + program], capture_output=True, text=True, env=env, cwd=root)
            for prefix in ("import cifarjax\n", "")]
    assert [r.stdout.strip() for r in runs] == ["xla", "ynnpack"], [r.stderr[-500:] for r in runs]
