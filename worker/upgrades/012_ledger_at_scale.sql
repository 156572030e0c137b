-- Version 11 to 12: the listings stay fast on a ledger of millions of rows. The filters ops
-- page by that match few rows (a state other than delivered, an error class) each have an
-- index in the listings' order, newest first on (created_at, id), so a page is read from
-- where it starts rather than found by sorting every match, or by reading the whole ledger
-- for a class that matches none. (An affiliate's deliveries, an order's and a span of time
-- already were.)
-- Building them reads the table while deliveries wait: 1.7 s for 5 million deliveries on
-- two cores with the table in memory, longer from disk.

-- The states other than delivered, which ops list, bulk replay selects and the gauges count.
DROP INDEX deliveries_state;
CREATE INDEX deliveries_state ON deliveries (state, created_at, id) WHERE state <> 'delivered';

-- The error class is set on the few deliveries that failed (dead, discarded, retrying).
CREATE INDEX deliveries_error_class ON deliveries (error_class, created_at, id)
    WHERE error_class IS NOT NULL;
