"""A released model lets its tokenizer go: unload and reload cycles do not leak."""

import gc
import weakref

from langchain_baichuan2 import ChatBaichuan2

from .tiny import tiny_chat_checkpoint


def test_the_tokenizer_is_collected_after_its_model_is_unloaded():
    llm = ChatBaichuan2(model=str(tiny_chat_checkpoint()), max_tokens=2, temperature=0)
    llm.invoke("hi")  # its prompt is encoded literally (the encoder cache is used)
    released = weakref.ref(llm.loaded_model().tokenizer)
    assert llm.unload()
    gc.collect()
    assert released() is None
