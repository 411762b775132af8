-- Runs and their stages.

-- name: insert_run
-- A run starts queued: it waits for the home's run lock before its first stage.
INSERT INTO runs (run_id, name, config_json, config_hash, status, flow_run_id, pid, host, process_started)
VALUES ($run_id, $name, $config_json, $config_hash, 'queued', $flow_run_id, $pid, $host, $process_started);

-- name: set_run_running
UPDATE runs SET status = 'running' WHERE run_id = $run_id AND status = 'queued';

-- name: unfinished_runs
-- Runs that claim to be queued or running, with the process that claimed it.
SELECT run_id, pid, host, process_started FROM runs WHERE status IN ('queued', 'running');

-- name: mark_run_crashed
UPDATE runs SET status = 'crashed', error = $error, finished_at = current_timestamp
WHERE run_id = $run_id AND status IN ('queued', 'running');

-- name: close_crashed_stages
UPDATE stage_runs
SET status = 'crashed', finished_at = current_timestamp, seconds = epoch(current_timestamp) - epoch(started_at)
WHERE run_id = $run_id AND status = 'running';

-- name: set_run_stage
UPDATE runs SET stage = $stage WHERE run_id = $run_id;

-- name: finish_run
UPDATE runs SET status = $status, error = $error, finished_at = current_timestamp
WHERE run_id = $run_id;

-- name: link_run_dataset
INSERT OR IGNORE INTO run_datasets VALUES ($run_id, $dataset_id);

-- name: start_stage
INSERT OR REPLACE INTO stage_runs (run_id, stage, status, started_at)
VALUES ($run_id, $stage, 'running', current_timestamp);

-- name: finish_stage
UPDATE stage_runs
SET status = $status, finished_at = current_timestamp,
    seconds = epoch(current_timestamp) - epoch(started_at), detail = $detail
WHERE run_id = $run_id AND stage = $stage;

-- name: get_run
SELECT run_id, name, config_json, status, stage, error, flow_run_id, started_at, finished_at
FROM runs WHERE run_id = $run_id;

-- name: list_runs
WITH latest_eval AS (
    SELECT run_id, arg_max(eval_id, created_at) AS eval_id FROM evaluations GROUP BY run_id
),
headline AS (
    SELECT e.run_id,
           max(m.value) FILTER (WHERE m.model_role = 'teacher' AND m.name = 'accuracy') AS teacher_acc,
           max(m.value) FILTER (WHERE m.model_role = 'student' AND m.name = 'accuracy') AS student_acc,
           max(m.value) FILTER (WHERE m.model_role = 'student' AND m.name = 'retention') AS retention
    FROM latest_eval e JOIN metrics m ON m.eval_id = e.eval_id AND m.category = '*'
    -- one model per role: the one evaluation_models lists (the first training seed's student)
    WHERE m.seed IS NOT DISTINCT FROM (SELECT em.seed FROM evaluation_models em
                                       WHERE em.eval_id = m.eval_id AND em.model_role = m.model_role)
    GROUP BY e.run_id
)
SELECT r.run_id, r.name, r.status, r.stage, r.error, r.started_at,
       epoch(coalesce(r.finished_at, current_timestamp)) - epoch(r.started_at) AS seconds,
       (SELECT string_agg(s.stage || ' ' || printf('%.1fs', coalesce(s.seconds, 0))
                          || CASE WHEN s.status = 'completed' THEN '' ELSE ' (' || s.status || ')' END,
                          ' · ' ORDER BY s.started_at)
          FROM stage_runs s WHERE s.run_id = r.run_id) AS stages,
       r.flow_run_id, h.teacher_acc, h.student_acc, h.retention
FROM runs r
LEFT JOIN headline h ON h.run_id = r.run_id
ORDER BY r.started_at DESC
LIMIT $limit;

-- name: stage_timings
SELECT stage, status, seconds, detail FROM stage_runs WHERE run_id = $run_id ORDER BY started_at;
