// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>
#include <linux/printk.h>

int glnv_hello_value(void);

static int __init glnv_user_init(void)
{
	pr_info("glnv_user: %d\n", glnv_hello_value());
	return 0;
}

module_init(glnv_user_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("gl-nvidia test module that uses its sibling's export");
