"""Example stand-in for the SGLang package (written for ecpatch; not SGLang code)."""
