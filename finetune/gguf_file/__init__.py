"""The GGUF file for llama.cpp and Ollama: where each Mixtral tensor goes and in what type (layout.py), the
tokenizer metadata (vocab.py), the streamed writer (write.py), the file read back as a checkpoint
(read.py), its verification against the merged weights (verify.py) and the Ollama Modelfile
(modelfile.py). `finetune export --gguf TYPE` (finetune/export.py) runs them. Needs the `gguf` package
(`pip install -e ".[gguf]"`), imported only here.

May import: finetune.errors, finetune.files, finetune.data, finetune.merge.
"""
