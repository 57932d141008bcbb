"""Structured outputs: grammar-constrained decoding through xgrammar (JSON schema, regex, choice,
EBNF grammar, any JSON object).

    params.py        StructuredOutputsParams, what a request asks for (SamplingParams.structured_outputs)
    schema_check.py  JSON-schema features the grammar enforces; the others are refused
    grammar.py       parse (at validation) and compile (in a worker thread, cached by spec)
    manager.py       the engine core's part: requests wait for their grammar, matchers, the step's bitmask
    bitmask.py       the mask applied to the logits in the sampler, one vectorized pass
"""

from lepton.engine.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
