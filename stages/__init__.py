"""The pipeline's stages, one module each: cache_teacher, train_student, finetune, evaluate."""
