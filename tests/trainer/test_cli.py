"""The trainer's command-line flags map onto config keys (the shorthands a newcomer reads in --help)."""

from __future__ import annotations

import pytest

from trainer.__main__ import config_from, parse_args


def test_shorthand_flags_set_their_config_keys():
    args = parse_args(["--dataset", "logs/ratings.csv", "--output-dir", "runs/mine", "--set", "data.protocol=leave_one_out"])
    cfg = config_from(args, environ={})
    assert cfg.data.dataset == "logs/ratings.csv"
    assert cfg.run.output_dir == "runs/mine"
    assert cfg.data.protocol == "leave_one_out"


def test_without_flags_the_report_goes_to_the_default_folder():
    assert config_from(parse_args([]), environ={}).run.output_dir == "runs/latest"


def test_an_unknown_protocol_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"data.protocol must be one of \('random', 'temporal', 'leave_one_out'\), "
                                         r"got 'loo'"):
        config_from(parse_args(["--set", "data.protocol=loo"]), environ={})


def test_the_ease_search_defaults_to_the_climb_and_refuses_other_names():
    assert config_from(parse_args([]), environ={}).eval.ease_search == "climb"
    assert config_from(parse_args(["--set", "eval.ease_search=grid"]), environ={}).eval.ease_search == "grid"
    with pytest.raises(ValueError, match=r"eval.ease_search must be one of \('climb', 'grid'\), got 'golden'"):
        config_from(parse_args(["--set", "eval.ease_search=golden"]), environ={})


def test_the_rankers_transition_channels_follow_the_protocol_unless_forced():
    """ranking.transition_mode auto: under temporal and leave-one-out only; on / off everywhere; transitions 0
    turns them off; bad values are refused with the choices."""
    from trainer.ranking_training import transitions_used

    def used(*settings: str) -> bool:
        return transitions_used(config_from(parse_args([a for s in settings for a in ("--set", s)]), environ={}))
    assert not used() and used("data.protocol=temporal") and used("data.protocol=leave_one_out")
    assert used("ranking.transition_mode=on") and not used("data.protocol=temporal", "ranking.transition_mode=off")
    assert not used("data.protocol=temporal", "ranking.transitions=0")
    with pytest.raises(ValueError, match=r"ranking.transition_mode must be one of \('auto', 'on', 'off'\), got 'yes'"):
        used("ranking.transition_mode=yes")
    with pytest.raises(ValueError, match=r"ranking.transitions must be >= 0, got -1"):
        used("ranking.transitions=-1")
    with pytest.raises(ValueError, match=r"ranking.transition_decay must be in \[0, 1\], got 1.5"):
        used("ranking.transition_decay=1.5")


def test_data_bad_rows_reaches_the_generic_loader(tmp_path):
    from trainer.data.dataset import DataError
    from trainer.prepare import load_dataset

    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,rating\nu1,1,4\nu2,2,\n")
    dropping = config_from(parse_args(["--dataset", str(log), "--set", "data.bad_rows=drop"]), environ={})
    assert load_dataset(dropping).report.dropped == {"missing rating": 1}
    with pytest.raises(DataError, match=r"line 3, column 'rating': rating is missing"):
        load_dataset(config_from(parse_args(["--dataset", str(log)]), environ={}))
    with pytest.raises(ValueError, match=r"data.bad_rows must be one of \('error', 'drop'\), got 'skip'"):
        config_from(parse_args(["--set", "data.bad_rows=skip"]), environ={})


def test_a_folder_with_one_log_file_is_read_as_that_log_and_others_name_their_files(tmp_path):
    from trainer.data.dataset import DataError
    from trainer.prepare import load_dataset

    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "README.md").write_text("exported from the shop\n")
    (folder / "events.csv.gz").write_bytes(__import__("gzip").compress(b"customer_id,sku\nc1,A\nc2,B\n"))
    data = load_dataset(config_from(parse_args(["--dataset", str(folder)]), environ={}))
    assert data.name == "events" and len(data.interactions) == 2
    assert data.report.warnings[0] == f"the folder {folder} holds one log file, events.csv.gz: read as a generic log"
    (folder / "other.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"not a MovieLens folder \(no u.data / ratings.dat / ratings.csv\) and not "
                                        r"a folder with one log file: it holds \['events.csv.gz', 'other.parquet'\]; "
                                        r"pass the log itself with --dataset FILE"):
        load_dataset(config_from(parse_args(["--dataset", str(folder)]), environ={}))


def test_a_folder_whose_ratings_csv_is_not_movielens_reads_it_as_a_generic_log(tmp_path):
    """goodbooks-style folders (``ratings.csv`` of ``user_id,book_id,rating`` beside ``books.csv`` and others)
    were taken for MovieLens' latest layout and refused ("missing column 'userId'")."""
    from trainer.data.dataset import DataError
    from trainer.data.movielens import is_movielens_folder
    from trainer.data.synthetic import generate, write_movielens_like
    from trainer.prepare import load_dataset

    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "ratings.csv").write_text("\ufeffuser_id,book_id,rating\r\n1,258,5\r\n2,4081,4\r\n2,260,5\r\n")
    (folder / "books.csv").write_text('book_id,title\n258,"Book, One"\n')
    (folder / "to_read.csv").write_text("user_id,book_id\n1,4081\n")
    assert not is_movielens_folder(folder)
    data = load_dataset(config_from(parse_args(["--dataset", str(folder)]), environ={}))
    assert data.interactions[["user_id", "item_id", "rating"]].values.tolist() == [["1", 258, 5.0], ["2", 4081, 4.0],
                                                                                  ["2", 260, 5.0]]
    assert data.report.warnings[0] == (f"the folder {folder} is not a MovieLens folder (its ratings.csv names no "
                                       "userId and movieId columns): ratings.csv read as a generic log, "
                                       "['books.csv', 'to_read.csv'] not read")
    latest = write_movielens_like(generate(30, 40, 300, seed=3), tmp_path / "latest", "latest")
    assert is_movielens_folder(latest)                              # MovieLens' own ratings.csv still is one
    assert load_dataset(config_from(parse_args(["--dataset", str(latest)]), environ={})).items["genres"].any()
    (folder / "ratings.csv").unlink()
    with pytest.raises(DataError, match=r"not a MovieLens folder .* it holds \['books.csv', 'to_read.csv'\]"):
        load_dataset(config_from(parse_args(["--dataset", str(folder)]), environ={}))


def test_the_baselines_command_runs_on_run_threads(tmp_path, capsys):
    """``run.threads`` bounds torch's threads for ``baselines`` as for training (it was ignored there:
    on a shared machine two MKL threads against a busy core made each EASE factorisation ~8x slower)."""
    import torch

    from trainer.__main__ import main
    from trainer.data.synthetic import generate, write_movielens_like

    folder = write_movielens_like(generate(60, 80, 600, seed=7), tmp_path / "ml", "1m")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["baselines", "--set", "run.threads=1", "--set", f"data.dataset={folder}"]) == 0
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert threads == 1
    assert "Protocol random" in capsys.readouterr().out


def test_a_bad_log_is_a_one_line_data_error_not_a_traceback(tmp_path, capsys):
    """Both commands print the loader's message (file, line, column) and exit 2."""
    from trainer.__main__ import main

    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\na,1,2024-01-01\nb,2,yesterday\n")
    for command in ("train", "baselines"):
        assert main([command, "--set", "run.threads=1", "--dataset", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("data error: ") and "Traceback" not in err
        assert "log.csv, line 3, column 'timestamp'" in err


def test_the_separator_setting_names_its_choices():
    assert config_from(parse_args(["--set", "data.sep=tab"]), environ={}).data.sep == "tab"
    with pytest.raises(ValueError, match=r"data.sep must be one of \('auto', 'comma', 'tab', 'semicolon', 'pipe', 'space'\)"):
        config_from(parse_args(["--set", "data.sep=;"]), environ={})


def test_a_log_too_small_to_split_is_a_data_error_naming_what_is_missing(tmp_path, capsys):
    """Tiny logs used to end in a traceback deep in training (an empty candidate list, k above the catalog)."""
    from trainer.__main__ import main

    path = tmp_path / "tiny.csv"
    path.write_text("user_id,item_id,rating,timestamp\n" + "".join(
        f"{u},{3 * u + k},{1 + (u + k) % 5},{1000 + k}\n" for u in range(8) for k in range(3)))   # 24 items
    for protocol, message in (("random", "split leaves 0 user(s) with a validation item"),
                              ("leave_one_out", "so the catalog needs at least 20 items")):
        assert main(["--set", "run.threads=1", "--set", f"data.protocol={protocol}", "--dataset", str(path),
                     "--output-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("data error: tiny: ") and message in err and "Traceback" not in err
