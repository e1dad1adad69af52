-- ironflow migration 20260422000001_add_observation_outcome (ironflow 0.4).
ALTER TABLE ironflow.input_observations
    ADD COLUMN IF NOT EXISTS outcome text NOT NULL DEFAULT 'accepted';
ALTER TABLE ironflow.input_observations
    ADD COLUMN IF NOT EXISTS rejection_payload jsonb;
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conname = 'input_observations_rejection_payload_matches_outcome'
          AND conrelid = 'ironflow.input_observations'::regclass
    ) THEN
        ALTER TABLE ironflow.input_observations
            ADD CONSTRAINT input_observations_rejection_payload_matches_outcome CHECK (
                (outcome = 'rejected' AND rejection_payload IS NOT NULL)
                OR (outcome <> 'rejected' AND rejection_payload IS NULL)
            );
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS input_observations_rejected_idx
    ON ironflow.input_observations (workflow_type, workflow_id, observed_at DESC)
    WHERE outcome = 'rejected';
