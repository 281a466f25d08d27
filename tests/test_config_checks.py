"""Option dataclasses check their values when built: the error names the gin key, the value and what was expected."""

import dataclasses

import pytest

from pe_rlhf import config_checks as C
from pe_rlhf.models.lora import LoRAConfig, LoRAError
from pe_rlhf.sharding.mesh import MeshConfig, MeshError
from pe_rlhf.train.config import DataConfig, LoopConfig, TuningConfig
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.policy import RLConfig


def test_words_of_each_check():
    assert C.integer(ge=1).expected == "an integer >= 1"
    assert C.integer(ge=64, multiple_of=64).expected == "an integer >= 64 that is a multiple of 64"
    assert C.number(gt=0).expected == "a finite number > 0"
    assert C.number(ge=0, lt=1).expected == "a finite number in [0, 1)"
    assert C.number(gt=0, le=1).expected == "a finite number in (0, 1]"
    assert C.optional(C.integer(ge=0)).expected == "None or an integer >= 0"
    assert C.either(C.integer(ge=1), C.choice(-1)).expected == "an integer >= 1 or -1"
    assert C.choice("lora", "full").expected == "one of 'lora', 'full'"


@pytest.mark.parametrize("value, ok", [(1, True), (0, False), (True, False), (5.0, False), (5.5, False),
                                       ("4", False), (None, False)])
def test_an_integer_is_an_int_not_a_bool_or_a_float(value, ok):
    assert C.integer(ge=1).ok(value) is ok


@pytest.mark.parametrize("value, ok", [(1e-4, True), (3, True), (0.0, False), (-1e-4, False), (float("inf"), False),
                                       (1e999, False), (float("nan"), False), (True, False), ("1e-4", False)])
def test_a_number_is_finite_and_not_a_bool(value, ok):
    assert C.number(gt=0).ok(value) is ok


def test_defaults_pass_the_checks_that_refuse_a_wrong_value_in_any_field():
    wrong = object()  # no check accepts it
    for cls in (TuningConfig, LoopConfig, DataConfig, OptimizerConfig, RLConfig, LoRAConfig, MeshConfig):
        default = cls()
        for field in dataclasses.fields(cls):
            with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{field.name}=<object object at "):
                dataclasses.replace(default, **{field.name: wrong})


@pytest.mark.parametrize("build, message", [
    # The defects of issue 15: each failed late (a TypeError mid-run, or after files were written) or not at all.
    (lambda: LoopConfig(batch_size="four"), "LoopConfig.batch_size='four': expected an integer >= 1"),
    (lambda: LoopConfig(num_steps=5.5), "LoopConfig.num_steps=5.5: expected an integer >= 1"),
    (lambda: OptimizerConfig(learning_rate=1e999), "OptimizerConfig.learning_rate=inf: expected a finite number > 0"),
    (lambda: OptimizerConfig(learning_rate=-1e-4),
     "OptimizerConfig.learning_rate=-0.0001: expected a finite number > 0"),
    (lambda: LoopConfig(log_every=0), "LoopConfig.log_every=0: expected an integer >= 1"),
    (lambda: LoopConfig(eval_every=-1), "LoopConfig.eval_every=-1: expected an integer >= 0"),
    (lambda: LoopConfig(progress_bar="no"), "LoopConfig.progress_bar='no': expected True or False"),
    (lambda: LoopConfig(mesh=4), "LoopConfig.mesh=4: expected None or a MeshConfig (in gin: @MeshConfig())"),
    (lambda: DataConfig(padding="top"), "DataConfig.padding='top': expected one of 'right', 'left'"),
    (lambda: DataConfig(eval_size=1.5),
     "DataConfig.eval_size=1.5: expected a finite number in (0, 1) or an integer >= 1"),
    (lambda: DataConfig(pack_length=100),
     "DataConfig.pack_length=100: expected None or an integer >= 64 that is a multiple of 64"),
    (lambda: TuningConfig(mode="LoRA"), "TuningConfig.mode='LoRA': expected one of 'lora', 'full'"),
    (lambda: TuningConfig(lora=8), "TuningConfig.lora=8: expected a LoRAConfig (in gin: @LoRAConfig())"),
    (lambda: OptimizerConfig(b2=1.0), "OptimizerConfig.b2=1.0: expected a finite number in [0, 1)"),
    (lambda: OptimizerConfig(warmup_steps=2.0), "OptimizerConfig.warmup_steps=2.0: expected an integer >= 0"),
    (lambda: RLConfig(top_p=0.0), "RLConfig.top_p=0.0: expected None or a finite number in (0, 1]"),
    (lambda: RLConfig(max_new_tokens=0), "RLConfig.max_new_tokens=0: expected an integer >= 1"),
    (lambda: RLConfig(kl_beta=float("nan")), "RLConfig.kl_beta=nan: expected a finite number >= 0"),
])
def test_a_wrong_value_fails_when_built_naming_its_gin_key(build, message):
    with pytest.raises(ValueError) as e:
        build()
    assert str(e.value) == message


def test_component_errors_keep_their_types():
    with pytest.raises(LoRAError, match=r"^LoRAConfig.alpha=inf: expected a finite number > 0$"):
        LoRAConfig(alpha=float("inf"))
    with pytest.raises(MeshError, match=r"^MeshConfig.fsdp=-2: expected an integer >= 1 or -1$"):
        MeshConfig(fsdp=-2)


def test_replace_checks_too():
    with pytest.raises(ValueError, match=r"^LoopConfig.checkpoint_every=0: expected an integer >= 1$"):
        dataclasses.replace(LoopConfig(), checkpoint_every=0)


def test_a_field_without_a_check_is_a_programming_error():
    @dataclasses.dataclass(frozen=True)
    class Half:
        a: int = 1
        b: int = 2

        def __post_init__(self):
            C.check_fields(self, a=C.integer(ge=0))

    with pytest.raises(TypeError, match=r"^Half: fields b have no check"):
        Half()
