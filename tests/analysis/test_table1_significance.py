"""Table 1's paired significance (msmedcap.analysis.table1.table1_significance): each variant against
the first, seed by seed, from the runs' predictions.jsonl as evaluate writes them (records scored by
pycocoevalcap and the findings parsers, tests/helpers/evaluations.py)."""
from helpers.evaluations import demo_records, write_run

from msmedcap.analysis import table1


def test_each_variant_against_the_first_per_seed(tmp_path):
    runs = {"blip2": demo_records(1), "msmedcap": demo_records(2, copy_ref_every=3)}
    for seed in (42, 43):
        for variant, (recs, scores) in runs.items():
            write_run(table1.run_dir(tmp_path, variant, seed), variant, recs, scores)
    write_run(table1.run_dir(tmp_path, "sam-blip2", 42), "sam-blip2", *runs["blip2"])  # seed 43 missing
    results = table1.table1_significance(tmp_path, ["blip2", "sam-blip2", "msmedcap"], [42, 43], resamples=40, seed=0)
    assert [(r["a"], r["b"], r["run_seed"]) for r in results] == [
        ("blip2", "sam-blip2", 42), ("blip2", "msmedcap", 42), ("blip2", "msmedcap", 43)]
    same = results[0]["metrics"]["CIDEr"]
    assert same["diff"] == 0 and same["p"] == 1.0  # sam-blip2's run here is a copy of blip2's
    assert results[1]["metrics"] == results[2]["metrics"]  # the same files, the same test seed
    assert results[1]["metrics"]["CIDEr"]["diff"] > 0
    md = table1.significance_markdown(results)
    assert "**msmedcap vs blip2**" in md and "| metric | seed 42 (n=24) | seed 43 (n=24) |" in md
    assert "**sam-blip2 vs blip2**" in md and "| metric | seed 42 (n=24) |" in md
