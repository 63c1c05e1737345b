"""GPU benchmarks of medcot (bench/README.md). bench/run.py is the command; one module per section:

    cli         arguments, the order of sections, and which module runs each section or worker
    common      the session, worker subprocesses and their deadlines, the environment record, merging results
    model       the architecture, tokenizer and random weights (section build), model FLOPs for MFU
    peak        section peak: the GPU's bf16 matmul rate
    train       sections train and levers: run_training at fixed shapes
    reference   section reference: the train job itself on synthetic rows
    generation  section eval: the evaluate job's generate
    chain       section chain: the five jobs, each its own process, as the containers run them
    decode      section decode: where an evaluate job's generation time goes
    render      BENCHMARKS.md from bench/results/*.json: one table per topic, its date, machine and versions, targets
"""
