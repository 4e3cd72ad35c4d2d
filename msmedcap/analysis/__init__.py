"""Research tools over trained runs: probes, the paper's Table 1 over seeds, caption-length studies.
They may import the core; the core never imports them."""
