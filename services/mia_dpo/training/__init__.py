"""Helpers of the train stage (docs/method.md §5): the pairs as a TRL dataset
(`data`), the TRL trainer and its LoRA targets (`trainers`), and checkpoints kept
in the store so a restarted task resumes (`checkpoints`). The stage itself is
`mia_dpo.stages.train`."""
