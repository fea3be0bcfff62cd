// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>

int glnv_no_such_kernel_symbol(void);

static int __init glnv_bad_init(void)
{
	return glnv_no_such_kernel_symbol();
}

module_init(glnv_bad_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("gl-nvidia test module that needs a symbol no kernel exports");
