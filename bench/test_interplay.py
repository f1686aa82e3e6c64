"""``bench/interplay.py``: one row per thread setting, each measured in its own process."""

import interplay


def test_every_setting_gets_a_row(capsys):
    interplay.main(["--reps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| setting")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(interplay.SETTINGS)
    for row in rows:
        loop_over_sum = row.split(" | ")[5]
        assert loop_over_sum.endswith("x") and float(loop_over_sum[:-1]) > 0
