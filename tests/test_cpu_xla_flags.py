import os
import subprocess
import sys
from pathlib import Path

from cifarjax.cpu.process import CPU_FLAGS, add_cpu_flags
from tests.helpers import skip_unless_measured_xla_cpu, temporary_bytes

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


def test_the_cpu_flags_give_convolutions_to_xla_not_ynnpack():
    """In a fresh process without XLA_FLAGS, the CPU's flags added before JAX starts (as a command running on the
    CPU adds them) make the stem's convolution XLA's own; importing cifarjax alone leaves the same program's in a
    YNNPACK fusion."""
    skip_unless_measured_xla_cpu("a YNNPACK fusion of the convolution")
    program = ("import jax, jax.numpy as jnp\n"
               "f = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), [(3, 3)] * 2,"
               " dimension_numbers=('NHWC', 'HWIO', 'NHWC')))\n"
               "text = f.lower(jnp.ones((8, 32, 32, 3)), jnp.ones((7, 7, 3, 64))).compile().as_text()\n"
               "print('ynnpack' if 'ynn_fusion' in text else 'xla')\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = Path(__file__).resolve().parents[1]
    runs = [subprocess.run([sys.executable, "-c", prefix + program], capture_output=True, text=True, env=env, cwd=root)
            for prefix in ("from cifarjax.cpu.process import add_cpu_flags\nadd_cpu_flags()\n", "import cifarjax\n")]
    assert [r.stdout.strip() for r in runs] == ["xla", "ynnpack"], [r.stderr[-500:] for r in runs]


def test_the_memory_schedule_is_for_runs_that_train_all_of_a_resnet():
    from cifarjax.config import Config
    from cifarjax.cpu.process import memory_schedule_pays
    resnet = dict(model="resnet18")
    assert memory_schedule_pays(Config(**resnet, unfreeze="all"))
    assert not memory_schedule_pays(Config(**resnet, unfreeze="layer4"))
    assert not memory_schedule_pays(Config(**resnet, unfreeze="head"))
    assert not memory_schedule_pays(Config(**resnet, unfreeze="head", bn="train"))  # statistics, no backward pass
    assert not memory_schedule_pays(Config(model="simple_cnn"))


def test_the_schedule_is_left_alone_once_the_backend_started_and_read_back_as_xla_would():
    import jax
    from cifarjax.config import Config
    from cifarjax.cpu.process import MEMORY_SCHEDULE, scheduler, schedule_for
    jax.devices()  # started: XLA has read its flags, so adding one would only mislead
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert schedule_for(Config(model="resnet18", unfreeze="all"), environ) == "default"
    assert environ == {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    name, value = next(iter(MEMORY_SCHEDULE.items()))
    assert scheduler({"XLA_FLAGS": f"--{name}=CPU_SCHEDULER_TYPE_DEFAULT --{name}={value}"}) == value
    assert scheduler({}) == "default"


def test_the_memory_schedule_needs_less_memory_and_changes_no_arithmetic():
    """A ResNet's gradient in train mode, compiled with XLA's default schedule and with `MEMORY_SCHEDULE`: fewer
    bytes of temporaries, and bit for bit the same gradients and statistics (only the order of operations
    changes). ResNet-18's stages with one block each and XLA's convolution: the same kind of program (half the
    temporaries, measured), compiled in a quarter of ResNet-18's time with the CPU's Winograd."""
    skip_unless_measured_xla_cpu("the memory schedule's smaller temporaries")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from cifarjax.models import ResNet, formulations_for
    from cifarjax.cpu.process import MEMORY_SCHEDULE
    model = ResNet(10, stage_sizes=(1, 1, 1, 1), formulations=formulations_for("xla", "cpu"))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
    # Any values show both properties: drawn here (initialising op by op took 10 of the test's 17 s of CPU).
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1], train=False))
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)

    def grads(params, x):
        def loss(p):
            logits, updates = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                                          mutable=["batch_stats"])
            return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), updates
        return jax.grad(loss, has_aux=True)(params)

    compiled = [jax.jit(grads, compiler_options=options).lower(variables["params"], x).compile()
                for options in (None, MEMORY_SCHEDULE)]
    default, memory = (temporary_bytes(c, "the memory schedule's bytes") for c in compiled)
    assert memory < default
    results = [c(variables["params"], x) for c in compiled]
    assert all(np.array_equal(a, b) for a, b in zip(*(jax.tree.leaves(r) for r in results)))
