import pytest

from effai.errors import UsageError
from effai.export.targets import TARGETS
from effai.registry import Registry


def test_unknown_name_lists_choices_and_suggests_closest():
    with pytest.raises(UsageError) as e:
        TARGETS.get("tflit")
    msg = str(e.value)
    assert "unknown target 'tflit'" in msg
    assert "did you mean 'tflite'?" in msg
    for name in ("coreml", "executorch", "onnx", "tflite"):
        assert name in msg
    assert e.value.exit_code == 2


def test_register_twice_is_an_error_and_decorator_form_works():
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)

    @reg.register("f")
    def f():
        return 2

    assert reg.get("f") is f and reg.names() == ["a", "f"] and "a" in reg
    with pytest.raises(ValueError):
        reg.register("a", 3)


def test_every_target_reports_availability_without_raising():
    for name, target in TARGETS.items():
        ok, detail = target.available()
        assert isinstance(ok, bool) and detail, name
        assert target.precisions, name
