-- The system of record. Every statement is idempotent; `schema_version` records what was applied.

-- name: create_schema
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER NOT NULL,
    applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS runs (
    run_id       VARCHAR PRIMARY KEY,
    name         VARCHAR NOT NULL,
    config_json  JSON NOT NULL,
    config_hash  VARCHAR NOT NULL,
    status       VARCHAR NOT NULL,          -- queued | running | completed | failed | cancelled | crashed
    stage        VARCHAR,                   -- the stage running, or the one that failed
    error        VARCHAR,
    flow_run_id  VARCHAR,                   -- the Prefect flow run, when run through Prefect
    started_at   TIMESTAMP NOT NULL DEFAULT current_timestamp,
    finished_at  TIMESTAMP
);
-- The process that runs it, so a run whose process died is found and marked crashed (older files: added).
ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid INTEGER;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS host VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS process_started DOUBLE;  -- the process's start, epoch seconds

CREATE TABLE IF NOT EXISTS stage_runs (
    run_id      VARCHAR NOT NULL,
    stage       VARCHAR NOT NULL,
    status      VARCHAR NOT NULL,           -- running | completed | reused | failed | cancelled | crashed
    started_at  TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    seconds     DOUBLE,
    detail      JSON,
    PRIMARY KEY (run_id, stage)
);

CREATE TABLE IF NOT EXISTS datasets (
    dataset_id   VARCHAR PRIMARY KEY,       -- name@content-hash prefix
    name         VARCHAR NOT NULL,
    version      INTEGER NOT NULL,
    content_hash VARCHAR NOT NULL,
    source       VARCHAR NOT NULL,
    layout       VARCHAR NOT NULL,
    n_questions  BIGINT NOT NULL,
    n_rejected   BIGINT NOT NULL,
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp
);
-- Of n_questions, those without a gold answer (older files: added, 0 as they could hold none).
ALTER TABLE datasets ADD COLUMN IF NOT EXISTS n_unlabeled BIGINT DEFAULT 0;

CREATE TABLE IF NOT EXISTS questions (
    dataset_id    VARCHAR NOT NULL,
    question_id   VARCHAR NOT NULL,
    dataset       VARCHAR NOT NULL,
    split         VARCHAR NOT NULL,
    category      VARCHAR NOT NULL,
    question      VARCHAR NOT NULL,
    options       VARCHAR[] NOT NULL,
    answer        INTEGER,                  -- 0-based gold option; NULL: an unlabeled question (split train)
    metadata      JSON,
    question_hash VARCHAR NOT NULL,         -- content hash: a label is valid for this exact text
    PRIMARY KEY (dataset_id, question_id)
);
-- Files from before unlabeled questions have answer NOT NULL (a no-op once dropped).
ALTER TABLE questions ALTER COLUMN answer DROP NOT NULL;

CREATE TABLE IF NOT EXISTS rejected_rows (
    dataset_id  VARCHAR NOT NULL,
    source      VARCHAR NOT NULL,
    row_number  BIGINT,
    reason_code VARCHAR NOT NULL,
    reason      VARCHAR NOT NULL,
    raw         VARCHAR
);

CREATE TABLE IF NOT EXISTS dataset_reading (   -- how a dataset version's input was read
    dataset_id VARCHAR PRIMARY KEY,
    identity   VARCHAR NOT NULL,                -- hash of content, layout, mapping, encoding, answers, sample
    answers    VARCHAR NOT NULL,                -- the answer semantics chosen for its answer column
    encoding   VARCHAR NOT NULL
);

CREATE TABLE IF NOT EXISTS question_notes (     -- kept questions worth knowing about (repeated options)
    dataset_id  VARCHAR NOT NULL,
    question_id VARCHAR NOT NULL,
    source      VARCHAR NOT NULL,
    row_number  BIGINT,
    note        VARCHAR NOT NULL
);

CREATE TABLE IF NOT EXISTS question_duplicates ( -- one question (same normalised content) in two datasets
    content_key       VARCHAR NOT NULL,
    dataset_id        VARCHAR NOT NULL,
    question_id       VARCHAR NOT NULL,
    other_dataset_id  VARCHAR NOT NULL,
    other_question_id VARCHAR NOT NULL,
    split             VARCHAR NOT NULL,         -- the one split both copies share
    PRIMARY KEY (dataset_id, question_id, other_dataset_id, other_question_id)
);

CREATE TABLE IF NOT EXISTS run_datasets (
    run_id     VARCHAR NOT NULL,
    dataset_id VARCHAR NOT NULL,
    PRIMARY KEY (run_id, dataset_id)
);

CREATE TABLE IF NOT EXISTS teachers (
    teacher_key VARCHAR PRIMARY KEY,        -- hash of model, revision, backend, scoring mode, prompt templates
    spec        JSON NOT NULL,
    model_path  VARCHAR,
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS soft_labels (
    question_id   VARCHAR NOT NULL,
    teacher_key   VARCHAR NOT NULL,
    question_hash VARCHAR NOT NULL,
    probs         DOUBLE[] NOT NULL,
    confidence    DOUBLE,
    predicted     INTEGER,
    coverage      DOUBLE,
    entropy       DOUBLE,
    reasoning     VARCHAR,
    latency_ms    DOUBLE,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (question_id, teacher_key, question_hash)
);
-- Added after the first release (databases created before get them here):
-- truncated: the prompt exceeded scoring.max_length and lost the middle of its question text;
-- predicted_norm: cloze with length normalisation, the option with the best log-likelihood per character.
ALTER TABLE soft_labels ADD COLUMN IF NOT EXISTS truncated BOOLEAN DEFAULT false;
ALTER TABLE soft_labels ADD COLUMN IF NOT EXISTS predicted_norm INTEGER;

CREATE TABLE IF NOT EXISTS validation_runs (
    validation_id  VARCHAR PRIMARY KEY,
    run_id         VARCHAR,
    teacher_key    VARCHAR NOT NULL,
    labels_digest  VARCHAR NOT NULL,        -- what was validated: the same digest reuses the verdict
    success        BOOLEAN NOT NULL,
    statistics     JSON NOT NULL,
    message        VARCHAR,
    data_docs_path VARCHAR,
    created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS validation_results (
    validation_id    VARCHAR NOT NULL,
    name             VARCHAR NOT NULL,
    gx_type          VARCHAR NOT NULL,
    level            VARCHAR NOT NULL,      -- row | dataset
    why              VARCHAR NOT NULL,
    success          BOOLEAN NOT NULL,
    unexpected_count BIGINT,
    unexpected_share DOUBLE,
    observed         VARCHAR
);

CREATE TABLE IF NOT EXISTS quarantine (
    validation_id VARCHAR NOT NULL,
    question_id   VARCHAR NOT NULL,
    teacher_key   VARCHAR NOT NULL,
    expectation   VARCHAR NOT NULL,
    detail        VARCHAR
);

CREATE TABLE IF NOT EXISTS teacher_calibrations (
    validation_id  VARCHAR PRIMARY KEY,     -- the gate verdict (label set and thresholds) it was fitted with
    teacher_key    VARCHAR NOT NULL,
    temperature    DOUBLE,                  -- NULL: no validation labels to fit on
    n_questions    BIGINT NOT NULL,         -- validation questions the temperature was fitted on
    nll_raw        DOUBLE,
    nll_calibrated DOUBLE,
    ece_raw        DOUBLE,
    ece_calibrated DOUBLE,
    note           VARCHAR,
    created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
);
-- A fit a guard rejected: its temperature is kept, `temperature` is NULL and the raw labels are used.
ALTER TABLE teacher_calibrations ADD COLUMN IF NOT EXISTS fitted_temperature DOUBLE;
-- The guard that rejected the fit ('too_few_questions', 'at_bound', 'no_nll_gain'); NULL when T is used.
ALTER TABLE teacher_calibrations ADD COLUMN IF NOT EXISTS fallback VARCHAR;

-- Suspect gold answers (kdflow/validate/label_issues.py), found once per gate verdict: one row per verdict
-- that was scanned (also when nothing was flagged), and one row per flagged question.
CREATE TABLE IF NOT EXISTS label_issue_scans (
    validation_id VARCHAR PRIMARY KEY,
    teacher_key   VARCHAR NOT NULL,
    dataset_ids   VARCHAR[] NOT NULL,
    method        VARCHAR NOT NULL,         -- confident_learning | margin | off
    temperature   DOUBLE,                   -- the calibration applied to the teacher's probabilities (NULL: raw)
    n_considered  BIGINT NOT NULL,          -- labeled, not quarantined questions, every split
    n_flagged     BIGINT NOT NULL,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS label_issues (
    validation_id  VARCHAR NOT NULL,
    question_id    VARCHAR NOT NULL,
    dataset_id     VARCHAR NOT NULL,
    dataset        VARCHAR NOT NULL,
    split          VARCHAR NOT NULL,
    category       VARCHAR NOT NULL,
    gold           INTEGER NOT NULL,        -- the stored (suspect) gold answer, 0-based option index
    teacher_choice INTEGER NOT NULL,        -- the teacher's most probable option
    teacher_prob   DOUBLE NOT NULL,         -- its calibrated probability
    gold_prob      DOUBLE NOT NULL,         -- the calibrated probability of the gold option
    score          DOUBLE NOT NULL,         -- teacher_prob - gold_prob: higher is more suspect
    threshold      DOUBLE NOT NULL,         -- what teacher_prob had to reach (the category's t_c, or min_confidence)
    method         VARCHAR NOT NULL,
    PRIMARY KEY (validation_id, dataset_id, question_id)
);

CREATE TABLE IF NOT EXISTS models (
    model_id    VARCHAR PRIMARY KEY,        -- role + content hash of what produced it
    run_id      VARCHAR,
    role        VARCHAR NOT NULL,           -- a role of kdflow/train/roles.py (teacher, student, ...)
    path        VARCHAR NOT NULL,
    spec        JSON NOT NULL,
    n_params    BIGINT,
    n_active    BIGINT,
    status      VARCHAR NOT NULL,           -- training | completed
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);
-- The seed a model was trained (a prepared teacher: with the first of training.seeds) or initialised with.
ALTER TABLE models ADD COLUMN IF NOT EXISTS seed INTEGER;

CREATE TABLE IF NOT EXISTS checkpoints (
    model_id   VARCHAR NOT NULL,
    step       BIGINT NOT NULL,
    path       VARCHAR NOT NULL,
    metrics    JSON,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (model_id, step)
);

CREATE TABLE IF NOT EXISTS training_metrics (
    model_id      VARCHAR NOT NULL,
    step          BIGINT NOT NULL,
    epoch         DOUBLE,
    loss          DOUBLE,
    ce            DOUBLE,
    kd            DOUBLE,
    lr            DOUBLE,
    grad_norm     DOUBLE,
    samples_per_s DOUBLE,
    val_accuracy  DOUBLE,
    PRIMARY KEY (model_id, step)
);

CREATE TABLE IF NOT EXISTS predictions (
    eval_id     VARCHAR NOT NULL,
    model_role  VARCHAR NOT NULL,
    question_id VARCHAR NOT NULL,
    probs       DOUBLE[] NOT NULL,
    predicted   INTEGER NOT NULL,
    confidence  DOUBLE NOT NULL,
    correct     BOOLEAN NOT NULL
);

CREATE TABLE IF NOT EXISTS metrics (
    eval_id    VARCHAR NOT NULL,
    model_role VARCHAR NOT NULL,
    category   VARCHAR NOT NULL,            -- '*' for overall
    name       VARCHAR NOT NULL,
    value      DOUBLE
);

CREATE TABLE IF NOT EXISTS evaluations (
    eval_id    VARCHAR PRIMARY KEY,
    run_id     VARCHAR,
    spec       JSON NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS cascade_points (
    eval_id          VARCHAR NOT NULL,
    tau              DOUBLE NOT NULL,
    accuracy         DOUBLE NOT NULL,
    share_to_teacher DOUBLE NOT NULL,
    latency_ms       DOUBLE NOT NULL,
    pareto           BOOLEAN NOT NULL,
    chosen           BOOLEAN NOT NULL
);

CREATE TABLE IF NOT EXISTS reliability_bins (
    eval_id    VARCHAR NOT NULL,
    model_role VARCHAR NOT NULL,
    bin        INTEGER NOT NULL,            -- 0 .. ece_bins - 1, equal-width confidence bins
    lower      DOUBLE NOT NULL,
    upper      DOUBLE NOT NULL,
    n          BIGINT NOT NULL,
    confidence DOUBLE,                      -- mean confidence of the bin's predictions (NULL when empty)
    accuracy   DOUBLE                       -- share of them that are correct
);

CREATE TABLE IF NOT EXISTS evaluation_models (
    eval_id    VARCHAR NOT NULL,
    model_role VARCHAR NOT NULL,
    path       VARCHAR,                     -- NULL: the teacher was read from its stored labels only
    model_id   VARCHAR,                     -- models.model_id of that path, to find its training metrics
    PRIMARY KEY (eval_id, model_role)
);

-- The training seed of each evaluated student (added with training.seeds; NULL: the teacher, or an evaluation
-- made before). Every seed's students have predictions, metrics and reliability bins; evaluation_models lists
-- one model per role, the first seed's, and the single-model report queries read those models' rows.
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS seed INTEGER;
ALTER TABLE metrics ADD COLUMN IF NOT EXISTS seed INTEGER;
ALTER TABLE reliability_bins ADD COLUMN IF NOT EXISTS seed INTEGER;
ALTER TABLE evaluation_models ADD COLUMN IF NOT EXISTS seed INTEGER;

-- The sweep (kdflow sweep): its teachers, its grid points, and evaluations reused across sweeps.
CREATE TABLE IF NOT EXISTS sweep_teachers (
    sweep_id      VARCHAR NOT NULL,         -- the run id of the sweep
    name          VARCHAR NOT NULL,         -- sweep.teachers[].name, or 'ensemble'
    teacher_key   VARCHAR NOT NULL,
    validation_id VARCHAR NOT NULL,
    spec          JSON NOT NULL,
    PRIMARY KEY (sweep_id, name)
);
CREATE TABLE IF NOT EXISTS sweep_points (
    sweep_id    VARCHAR NOT NULL,
    point_id    VARCHAR NOT NULL,           -- hash of teacher name, training and student settings
    label       VARCHAR NOT NULL,
    teacher     VARCHAR NOT NULL,
    teacher_key VARCHAR NOT NULL,
    settings    JSON NOT NULL,              -- the swept setting paths and their values
    baseline    BOOLEAN NOT NULL,
    model_id    VARCHAR,
    model_path  VARCHAR,
    eval_id     VARCHAR,
    trained     BOOLEAN,                    -- false: the student was reused from an earlier run
    PRIMARY KEY (sweep_id, point_id)
);
CREATE TABLE IF NOT EXISTS sweep_evaluations (
    eval_key VARCHAR PRIMARY KEY,           -- hash of the student model, teacher labels, datasets, settings
    eval_id  VARCHAR NOT NULL
);

-- name: schema_version
SELECT coalesce(max(version), 0) FROM schema_version;

-- name: record_schema_version
INSERT INTO schema_version (version) VALUES ($version);
