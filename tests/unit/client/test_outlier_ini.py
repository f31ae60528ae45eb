"""The outlier-ejection keys of ``[consumer]``: read into ClientOptions, and
a bad value refused with one error line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from twisted_rpc import ClientOptions, ConfigError, load_consumer_config

DEFAULTS = ClientOptions()


def _ini(tmp_path: Path, lines: str) -> str:
    path = tmp_path / "consumer.ini"
    path.write_text(f"[consumer]\n{lines}\n[providers]\nx.Y = 127.0.0.1:1\n")
    return str(path)


def test_the_keys_load(tmp_path: Path) -> None:
    options = load_consumer_config(
        _ini(
            tmp_path,
            "consecutive_failures = 3\nbase_ejection_time = 2.5\nmax_ejection_time = 60\n"
            "max_ejection_percent = 20\nlatency_decay = 4",
        )
    ).options
    assert options.consecutive_failures == 3
    assert options.base_ejection_time == 2.5
    assert options.max_ejection_time == 60.0
    assert options.max_ejection_percent == 20
    assert options.latency_decay == 4.0


def test_unset_keys_keep_the_defaults(tmp_path: Path) -> None:
    options = load_consumer_config(_ini(tmp_path, "timeout = 1")).options
    assert (
        options.consecutive_failures,
        options.base_ejection_time,
        options.max_ejection_time,
        options.max_ejection_percent,
        options.latency_decay,
    ) == (
        DEFAULTS.consecutive_failures,
        DEFAULTS.base_ejection_time,
        DEFAULTS.max_ejection_time,
        DEFAULTS.max_ejection_percent,
        DEFAULTS.latency_decay,
    )


def test_the_success_rate_keys_load(tmp_path: Path) -> None:
    options = load_consumer_config(
        _ini(
            tmp_path,
            "success_rate_min_calls = 50\nsuccess_rate_min_providers = 2\n"
            "success_rate_ratio = 0.5\nsuccess_rate_window = 30",
        )
    ).options
    assert (
        options.success_rate_min_calls,
        options.success_rate_min_providers,
        options.success_rate_ratio,
        options.success_rate_window,
    ) == (50, 2, 0.5, 30.0)
    assert (DEFAULTS.success_rate_min_calls, DEFAULTS.success_rate_min_providers) == (100, 3)
    assert (DEFAULTS.success_rate_ratio, DEFAULTS.success_rate_window) == (0.85, 10.0)


def test_zero_failures_turns_ejection_off(tmp_path: Path) -> None:
    options = load_consumer_config(_ini(tmp_path, "consecutive_failures = 0")).options
    assert options.consecutive_failures == 0


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("consecutive_failures = 2.5", "consecutive_failures = '2.5' is not a number"),
        ("consecutive_failures = -1", "consecutive_failures must be at least 0"),
        ("base_ejection_time = 0", "base_ejection_time must be finite and more than 0"),
        ("base_ejection_time = nan", "base_ejection_time = 'nan' is not a finite number"),
        ("max_ejection_time = 10", "max_ejection_time must be finite and at least 30"),
        ("max_ejection_percent = 101", "max_ejection_percent must be 0 to 100, not 101"),
        ("max_ejection_percent = lots", "max_ejection_percent = 'lots' is not a number"),
        ("latency_decay = 0", "latency_decay must be finite and more than 0"),
        ("latency_decay = -3", "latency_decay must be at least 0"),
        ("success_rate_min_providers = 1", "success_rate_min_providers must be finite and at"),
        ("success_rate_ratio = 1.2", "success_rate_ratio must be at most 1, not 1.2"),
        ("success_rate_window = 0", "success_rate_window must be finite and more than 0"),
    ],
)
def test_a_bad_value_is_one_line(tmp_path: Path, line: str, says: str) -> None:
    path = _ini(tmp_path, line)
    with pytest.raises(ConfigError) as caught:
        load_consumer_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: [consumer] ")
    assert says in message
