from opdx.metrics import JsonlLogger, read_metrics, timed


def test_jsonl_logger_writes_one_record_per_step_and_truncates_on_resume(tmp_path):
    logger = JsonlLogger(tmp_path, {})
    for step in range(5):
        logger.log({"train/loss": float(step)}, step)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
    JsonlLogger(tmp_path, {}, resume_from_step=2)
    assert read_metrics(tmp_path) == [{"step": s, "train/loss": float(s)} for s in range(3)]
    JsonlLogger(tmp_path, {})  # a fresh run in the same directory starts over
    assert read_metrics(tmp_path) == []


def test_timed_accumulates_seconds():
    metrics = {}
    with timed(metrics, "rollout"):
        sum(range(1000))
    first = metrics["time/rollout"]
    with timed(metrics, "rollout"):
        sum(range(1000))
    assert 0 < first < metrics["time/rollout"] < 1
