-- Storage parameters for the two queue tables (issue 20 §7; docs/scaling.md "Big tables").
-- Storage parameters are additions: ironflow's columns and indexes are unchanged, and
-- ironflow reads and writes these tables exactly as before.
--
-- fillfactor 50: each row is updated three times within moments of its insert (claim,
-- start guard, processed mark), and a claim takes a whole page's rows at once. A HOT update
-- needs room for the new version on the row's own page: at 50 every start guard of a drain
-- was HOT (3,000 effects: 3,000 of 3,000), at 70 three in four (2,252 and 2,371). The
-- price is heap space: pages are filled to half by inserts (docs/scaling.md). Existing
-- pages keep their fill until rewritten.
--
-- Autovacuum by dead rows, not by table size: the default (20 percent of the table) lets a table
-- holding a long processed history collect hundreds of thousands of dead row versions
-- between vacuums (200,000 effects: 600,000 dead tuples, a 4 MiB claim index, a 36 ms
-- claim). Here a vacuum starts after 1,000 + 2 percent of the rows changed, and inserts also
-- trigger one (visibility map, index-only scans of the history).
ALTER TABLE ironflow.outbox SET (
    fillfactor = 50,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02
);
ALTER TABLE ironflow.timers SET (
    fillfactor = 50,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02
);
