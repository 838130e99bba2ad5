"""The command line: exit codes, one-line errors, sql, report and the database lock."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from mammo_dissect.core import cli as cli_module


CLI = [sys.executable, "-m", "mammo_dissect"]


def write_toml(path: Path, config: dict) -> Path:
    lines = []
    scalars = {k: v for k, v in config.items() if not isinstance(v, dict)}
    for key, value in scalars.items():
        lines.append(f"{key} = {json.dumps(value)}")
    for section, body in config.items():
        if not isinstance(body, dict):
            continue
        lines.append(f"[{section}]")
        for key, value in body.items():
            if isinstance(value, dict):
                inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {inline} }}")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def invoke(args: list[str]) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(cli_module.cli, args, catch_exceptions=True)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(args)
        sys.exit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def completed_run(tiny_config, tiny_registry, tmp_path, capsys):
    config_path = write_toml(tmp_path / "run.toml", tiny_config)
    code, out, err = run_main(["-q", "run", str(config_path)], capsys)
    assert code == 0, err
    return Path(tiny_config["database"]), out


def test_run_prints_summary(completed_run):
    _, out = completed_run
    assert "layer features.2: 6 units labelled" in out


def test_sql_prints_table(completed_run, capsys):
    database, _ = completed_run
    code, out, _ = run_main(["sql", str(database), "SELECT count(*) AS n FROM unit_labels"], capsys)
    assert code == 0
    assert out.splitlines()[2].strip() == "39"


def test_sql_json(completed_run, capsys):
    database, _ = completed_run
    code, out, _ = run_main(["sql", str(database), "SELECT status FROM runs", "--json"], capsys)
    assert json.loads(out) == [{"status": "completed"}]


def test_sql_csv(completed_run, capsys):
    database, _ = completed_run
    code, out, _ = run_main(["sql", str(database), "SELECT 1 AS a, 'x' AS b", "--csv"], capsys)
    assert out.splitlines() == ["a,b", "1,x"]


def test_sql_rejects_writes(completed_run, capsys):
    database, _ = completed_run
    code, _, err = run_main(["sql", str(database), "DELETE FROM unit_labels"], capsys)
    assert code == 1
    assert err.startswith("error: ")


def test_report_renders(completed_run, tmp_path, capsys):
    database, _ = completed_run
    code, out, _ = run_main(["report", str(database), "--out", str(tmp_path / "report")], capsys)
    assert code == 0
    assert (tmp_path / "report" / "index.html").is_file()


def test_unknown_plugin_one_line_error(tiny_config, tiny_registry, tmp_path, capsys):
    config = copy.deepcopy(tiny_config)
    config["dissector"]["name"] = "mammoclip"
    code, out, err = run_main(["run", str(write_toml(tmp_path / "r.toml", config))], capsys)
    assert code == 1
    assert "error: unknown dissector 'mammoclip'" in err
    assert "Traceback" not in err


def test_invalid_field_names_field_and_values(tiny_config, tiny_registry, tmp_path, capsys):
    config = copy.deepcopy(tiny_config)
    config["target"]["pooling"] = "median"
    code, _, err = run_main(["run", str(write_toml(tmp_path / "r.toml", config))], capsys)
    assert code == 1
    assert "target.pooling: Input should be 'avg' or 'max' (got 'median')" in err


def test_unknown_config_key(tiny_config, tiny_registry, tmp_path, capsys):
    config = dict(tiny_config, batchsize=4)
    code, _, err = run_main(["run", str(write_toml(tmp_path / "r.toml", config))], capsys)
    assert code == 1
    assert "batchsize: unknown field" in err


def test_unknown_plugin_option(tiny_config, tiny_registry, tmp_path, capsys):
    config = copy.deepcopy(tiny_config)
    config["target"]["options"] = {"seeds": 3}
    code, _, err = run_main(["run", str(write_toml(tmp_path / "r.toml", config))], capsys)
    assert "target.options.seeds: unknown field" in err


def test_set_override_applies(tiny_config, tiny_registry, tmp_path, capsys):
    config_path = write_toml(tmp_path / "r.toml", tiny_config)
    code, _, err = run_main(["-q", "run", str(config_path), "--set", "similarity.params.top_k=50"], capsys)
    assert code == 1
    assert "needs at least 50 probe images" in err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_main(["run", str(tmp_path / "none.toml")], capsys)
    assert code == 1
    assert "configuration file not found" in err


def test_invalid_toml(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    code, _, err = run_main(["run", str(path)], capsys)
    assert "invalid TOML" in err


def test_database_locked_by_other_process(tiny_config, tiny_registry, tmp_path, capsys):
    database = Path(tiny_config["database"])
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time, duckdb
            con = duckdb.connect({str(database)!r})
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        config_path = write_toml(tmp_path / "r.toml", tiny_config)
        code, _, err = run_main(["run", str(config_path)], capsys)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert code == 1
    assert str(database) in err
    assert "another process" in err


def test_layers_command_lists_shapes(capsys):
    code, out, _ = run_main(["layers", "efficientnet-lite", "--filter", "_conv_head"], capsys)
    assert code == 0
    assert "1280x7x7" in out


def test_layers_unknown_loader(capsys):
    code, _, err = run_main(["layers", "efficientnet"], capsys)
    assert code == 1
    assert "closest: efficientnet-lite" in err


def test_python_m_entry_point():
    result = subprocess.run([*CLI, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("mammo-dissect, version")


def test_sanity_command_table(capsys):
    code, out, _ = run_main(["sanity", "correlation", "rank_reorder"], capsys)
    assert code == 0
    assert "| correlation | defaults | missing label | 20/20 |" in out
    assert "| rank_reorder | defaults | extra label | 0/20 |" in out


def test_sanity_command_json_params(capsys):
    code, out, _ = run_main(["sanity", "iou", "--param", "quantile=0.75", "--json"], capsys)
    results = json.loads(out)
    assert [result["passed"] for result in results] == [True, True]
    assert results[0]["params"] == {"quantile": 0.75}


def test_sanity_unknown_param(capsys):
    code, _, err = run_main(["sanity", "correlation", "--param", "top_k=3"], capsys)
    assert code == 1
    assert "unknown parameter(s) top_k" in err
