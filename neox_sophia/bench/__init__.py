"""The convergence benchmark behind tools/bench_convergence.py (AdamW against Sophia and its
variants, each tuned on a grid by validation loss).

    curves     the arithmetic on validation curves: steps-to-loss ratios, grid edges, stability,
               metric curves from the trainer's metrics.jsonl (pure; unit-tested)
    variants   the registry of named Sophia variants (--variant) and their --set overrides
    runs       one grid point through the trainer; the grid search and its edge rule; --jobs
    report     the result JSON of one corpus x variant, --adamw-from, --summarize
    plots      the figure of one result: loss curves and per-group win rate / h == 0 share
"""
