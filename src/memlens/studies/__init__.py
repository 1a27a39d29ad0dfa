"""Whole experiments built from the methods: each runs several of them and writes results.

    bench_edits(handle, cases, [1, 10, 100])        # scaling: editing quality vs number of edits
    evaluate_organism(path)                          # organism_report: does the science show?
    run_all(handle, paragraphs, out, Settings())     # memorization: scan, perturb, …, edit
    run_all("organism:facts-gpt2", out)              # topk: TopK LM vs dense twin, neurons, steer
    evaluate_pair(topk_dir, dense_dir, out=out)      # organism_tasks: the pair on harness tasks
    run_sections(out, DemoConfig())                  # demo: the whole story, one section each

Studies sit above the methods and the organisms and below the report (docs/architecture.md):
a study that grows inside a method package is how an import circle starts.
"""
