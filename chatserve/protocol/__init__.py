"""Every wire model of chatserve: the public OpenAI schema, the internal plane, the error envelope."""
