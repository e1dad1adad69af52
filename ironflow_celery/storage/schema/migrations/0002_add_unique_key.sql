-- ironflow migration 20260213000001_add_unique_key (ironflow 0.3).
ALTER TABLE ironflow.workflow_instances ADD COLUMN IF NOT EXISTS unique_key text;
CREATE UNIQUE INDEX IF NOT EXISTS idx_workflow_instances_active_unique_key
    ON ironflow.workflow_instances (workflow_type, unique_key)
    WHERE completed_at IS NULL AND unique_key IS NOT NULL;
