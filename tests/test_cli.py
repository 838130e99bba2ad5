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


@pytest.mark.parametrize("device", ["mps", "cpu:abc", "cuda:7", "tpu"])
def test_unavailable_device_rejected_before_run(tiny_config, tiny_registry, tmp_path, capsys, device):
    config = dict(tiny_config, device=device)
    code, _, err = run_main(["run", str(write_toml(tmp_path / "r.toml", config))], capsys)
    assert code == 1
    assert "device" in err
    assert not Path(tiny_config["database"]).exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=99999999999999999999", "seed"),
        ("batch_size=true", "batch_size"),
        ('database=""', "must not be empty"),
    ],
)
def test_bad_scalar_rejected(tiny_config, tiny_registry, tmp_path, capsys, override, message):
    config_path = write_toml(tmp_path / "r.toml", tiny_config)
    code, _, err = run_main(["run", str(config_path), "--set", override], capsys)
    assert code == 1
    assert message in err


def test_toml_with_bom_accepted(tiny_config, tiny_registry, tmp_path, capsys):
    path = write_toml(tmp_path / "r.toml", tiny_config)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    code, _, err = run_main(["-q", "run", str(path)], capsys)
    assert code == 0, err


def test_database_below_a_file(tiny_config, tiny_registry, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    config_path = write_toml(tmp_path / "r.toml", dict(tiny_config, database=str(blocker / "db.duckdb")))
    code, _, err = run_main(["run", str(config_path)], capsys)
    assert code == 1
    assert "cannot create the folder of the results database" in err


def test_sqlite_file_as_database(tiny_config, tiny_registry, tmp_path, capsys):
    import sqlite3

    database = tmp_path / "sqlite.duckdb"
    with sqlite3.connect(database) as con:
        con.execute("CREATE TABLE t (a)")
    config_path = write_toml(tmp_path / "r.toml", dict(tiny_config, database=str(database)))
    code, _, err = run_main(["run", str(config_path)], capsys)
    assert code == 1
    assert "is an SQLite database" in err


def test_report_below_a_file(completed_run, tmp_path, capsys):
    database, _ = completed_run
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = run_main(["report", str(database), "--out", str(blocker / "report")], capsys)
    assert code == 1
    assert err.startswith("error: ")
    assert "Traceback" not in err


def test_report_of_failed_run_warns(tiny_config, tiny_registry, synthetic_probe, tmp_path, capsys):
    (synthetic_probe / "img007.png").write_bytes(b"not a png at all")
    config_path = write_toml(tmp_path / "r.toml", tiny_config)
    run_main(["run", str(config_path)], capsys)
    code, _, err = run_main(["report", tiny_config["database"], "--out", str(tmp_path / "rep")], capsys)
    assert code == 0
    assert "has status failed" in err


@pytest.mark.parametrize("size", [["0", "0"], ["-5", "10"], ["100000", "100000"]])
def test_layers_bad_input_size(capsys, size):
    code, _, err = run_main(["layers", "efficientnet-lite", "--input-size", *size], capsys)
    assert code == 1
    assert "--input-size" in err


def test_layers_filter_with_brackets(capsys):
    code, out, _ = run_main(["layers", "efficientnet-lite", "--filter", "_blocks[15]._project_conv"], capsys)
    assert code == 0
    assert "_blocks.15._project_conv " in out


def test_layers_filter_no_match(capsys):
    code, _, err = run_main(["layers", "efficientnet-lite", "--filter", "zzz"], capsys)
    assert code == 1
    assert "no layer name" in err


def test_sigterm_marks_run_interrupted(tiny_config, tmp_path):
    """A run killed with SIGTERM mid-extraction is recorded as interrupted, with no labels."""
    import signal

    import duckdb

    script = tmp_path / "slow_run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys._called_from_test = True
        from mammo_dissect.core import plugins, cli
        from mammo_dissect.tests import tiny_plugins
        plugins.set_registry(plugins.Registry(plugins.create_manager(extra_plugins=[tiny_plugins])))
        original = tiny_plugins.SyntheticReader.load
        def slow_load(self, options):
            probe = original(self, options)
            read = probe.read
            def slow_read(index):
                if index == 0:
                    print("extracting", flush=True)
                time.sleep(0.2)
                return read(index)
            probe.read = slow_read
            return probe
        tiny_plugins.SyntheticReader.load = slow_load
        cli.main(["run", {str(write_toml(tmp_path / "r.toml", tiny_config))!r}])
    """))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "extracting"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143
    assert "terminated by SIGTERM" in err
    with duckdb.connect(tiny_config["database"], read_only=True) as con:
        assert con.execute("SELECT status FROM runs").fetchall() == [("interrupted",)]
        assert con.execute("SELECT count(*) FROM unit_labels").fetchone()[0] == 0
    assert not any((Path(tiny_config["cache_dir"]) / "runs").glob("*/*.npy")), "activation files left behind"


def test_cache_ls_and_rm(completed_run, tiny_config, capsys):
    cache_dir = tiny_config["cache_dir"]
    code, out, _ = run_main(["cache", "ls", "--cache-dir", cache_dir], capsys)
    assert code == 0
    assert out.count(" ok ") == 8  # 3 layers' activations and scores, 2 layers' activation maps
    code, out, _ = run_main(["cache", "rm", "--cache-dir", cache_dir, "--kind", "activations"], capsys)
    assert out.strip() == "removed 3 cache entries (0.0 MB)"
    code, out, _ = run_main(["cache", "rm", "--cache-dir", cache_dir, "--kind", "scores"], capsys)
    assert out.strip() == "removed 3 cache entries (0.0 MB)"


def test_cache_rm_needs_a_filter(tmp_path, capsys):
    code, _, err = run_main(["cache", "rm", "--cache-dir", str(tmp_path)], capsys)
    assert code == 1
    assert "--all" in err


def test_run_recompute_flag(completed_run, tiny_config, tmp_path, capsys):
    config_path = write_toml(tmp_path / "again.toml", dict(tiny_config, database=str(tmp_path / "again.duckdb")))
    code, _, err = run_main(["run", str(config_path), "--recompute"], capsys)
    assert code == 0
    assert "(--recompute)" in err


def hold_lock(database: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time, duckdb
            con = duckdb.connect({str(database)!r})
            print("locked", flush=True)
            time.sleep({seconds})
            con.close()
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_wait_for_locked_database(tiny_config, tiny_registry, tmp_path, capsys):
    holder = hold_lock(Path(tiny_config["database"]), 2)
    try:
        config_path = write_toml(tmp_path / "r.toml", tiny_config)
        code, _, err = run_main(["run", str(config_path), "--wait", "30"], capsys)
    finally:
        holder.wait()
        holder.stdout.close()
    assert code == 0, err
    assert "waiting up to 30 s" in err


def test_wait_times_out(tiny_config, tiny_registry, tmp_path, capsys):
    holder = hold_lock(Path(tiny_config["database"]), 20)
    try:
        config_path = write_toml(tmp_path / "r.toml", tiny_config)
        code, _, err = run_main(["run", str(config_path), "--wait", "1"], capsys)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert code == 1
    assert "timed out after waiting 1 s" in err


def test_dry_run_prints_plan(tiny_config, tiny_registry, tmp_path, capsys):
    config_path = write_toml(tmp_path / "r.toml", tiny_config)
    code, out, _ = run_main(["-q", "run", str(config_path), "--dry-run"], capsys)
    assert code == 0
    assert "features.2  6x16x16  6" in out
    assert "dry run: nothing was extracted or written" in out
    assert not Path(tiny_config["database"]).exists()


def test_concepts_list_json(capsys):
    code, out, _ = run_main(["concepts", "list", "--json"], capsys)
    names = {row["name"] for row in json.loads(out)}
    assert {"text", "annotations", "mammography-basic", "table", "workbook"} <= names


def test_concepts_check_reports_duplicates(tmp_path, capsys):
    path = tmp_path / "c.txt"
    path.write_text("mass\n\nMass\n" + "very " * 90 + "long concept\n")
    code, out, _ = run_main(["-q", "concepts", "check", str(path)], capsys)
    assert code == 0
    assert "2 concepts kept of 4 entries" in out
    assert "duplicate 'Mass' (same as 'mass')" in out
    assert "over 77 tokens" in out and ": 1" in out


def test_concepts_check_missing_file(tmp_path, capsys):
    code, _, err = run_main(["concepts", "check", str(tmp_path / "none.txt")], capsys)
    assert code == 1
    assert "not found" in err


def test_check_dissector_ground_truth_is_perfect(tiny_config, tiny_registry, tmp_path, capsys):
    config_path = write_toml(tmp_path / "r.toml", tiny_config)
    code, out, _ = run_main(["-q", "check-dissector", str(config_path), "--json"], capsys)
    results = {result["concept"]: result for result in json.loads(out)}
    assert code == 0
    assert set(results) == {"bright", "dark", "striped", "plain"}
    assert {result["auroc"] for result in results.values()} == {1.0}


def test_check_dissector_needs_annotations(tiny_config, tiny_registry, synthetic_probe, tmp_path, capsys):
    config = dict(tiny_config, probe_set={"name": "folder", "options": {"root": str(synthetic_probe)}})
    code, _, err = run_main(["check-dissector", str(write_toml(tmp_path / "r.toml", config))], capsys)
    assert code == 1
    assert "needs a labelled probe set" in err


def test_report_compares_two_runs(tiny_config, tiny_registry, tmp_path, capsys):
    config_path = write_toml(tmp_path / "r.toml", tiny_config)
    run_main(["-q", "run", str(config_path)], capsys)
    run_main(["-q", "run", str(config_path), "--set", 'target.pooling="max"'], capsys)
    _, out, _ = run_main(["runs", tiny_config["database"]], capsys)
    run_ids = [line.split()[0] for line in out.splitlines()[2:4]]
    code, out, err = run_main(["report", tiny_config["database"], "--run", run_ids[0], "--run", run_ids[1],
                               "--out", str(tmp_path / "compare")], capsys)
    assert code == 0, err
    assert (tmp_path / "compare" / "index.html").is_file()
    assert (tmp_path / "compare" / "run-1" / "index.html").is_file()


def test_validate_command(completed_run, capsys):
    database, out = completed_run
    run_id = out.split()[1]
    code, out, err = run_main(["-q", "validate", str(database), "--run", run_id], capsys)
    assert code == 0, err
    assert "features.2" in out
    assert "mean AUROC" in out


def test_chance_command(tiny_config, tiny_registry, tmp_path, capsys):
    config_path = write_toml(tmp_path / "r.toml", dict(tiny_config, permutations=0))
    code, out, err = run_main(["-q", "chance", str(config_path), "--seeds", "2", "--shuffled", "1"], capsys)
    assert code == 0, err
    assert "random" in out
    assert "shuffled_concepts" in out


def test_stability_command(tiny_config, tiny_registry, tmp_path, capsys):
    config_path = write_toml(tmp_path / "r.toml", dict(tiny_config, permutations=0))
    code, out, err = run_main(["-q", "stability", str(config_path), "--bootstrap", "2", "--noise", "0.02"], capsys)
    assert code == 0, err
    assert "bootstrap" in out


def test_shard_and_ingest_commands(tiny_config, tiny_registry, tmp_path, capsys):
    config_path = write_toml(tmp_path / "r.toml", tiny_config)
    for index in (1, 2):
        code, out, err = run_main(["-q", "run", str(config_path), "--shard", f"{index}/2"], capsys)
        assert code == 0, err
        assert f"shard {index}/2 extracted" in out
    assert not Path(tiny_config["database"]).exists()
    code, out, err = run_main(["-q", "ingest", str(config_path)], capsys)
    assert code == 0, err
    assert "assembled 3 layer(s) from the shards" in out
    assert "layer features.2: 6 units labelled" in out


def test_ingest_with_missing_shard(tiny_config, tiny_registry, tmp_path, capsys):
    config_path = write_toml(tmp_path / "r.toml", tiny_config)
    run_main(["-q", "run", str(config_path), "--shard", "1/3"], capsys)
    code, _, err = run_main(["ingest", str(config_path)], capsys)
    assert code == 1
    assert "2/3, 3/3" in err


def test_bad_shard_value(tiny_config, tiny_registry, tmp_path, capsys):
    config_path = write_toml(tmp_path / "r.toml", tiny_config)
    code, _, err = run_main(["run", str(config_path), "--shard", "0/4"], capsys)
    assert code == 1
    assert "0/4" in err
