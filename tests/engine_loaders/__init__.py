"""A re-implementation of how TensorRT-LLM finds and uses KV scales in a checkpoint, written from
its sources (``trtllm.py`` names the files it mirrors): TensorRT-LLM needs CUDA and TensorRT and
does not import on a CPU machine. vLLM and SGLang are tested with their own code in
``tests/engines/``. ``fixtures.py`` builds the tiny models and scales files the tests share."""
