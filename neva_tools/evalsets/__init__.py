"""Published benchmarks for ``neva eval``: MMBench-layout TSVs (VLMEvalKit's prompts, answer extraction, CircularEval
and table) and LLaVA's evaluation question files (answers in LLaVA's layout; POPE and ScienceQA scored in-tool)."""
