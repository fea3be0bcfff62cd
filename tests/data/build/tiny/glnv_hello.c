// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>
#include <linux/printk.h>

int glnv_hello_value(void)
{
	return 42;
}
EXPORT_SYMBOL(glnv_hello_value);

static int __init glnv_hello_init(void)
{
	pr_info("glnv_hello: loaded\n");
	return 0;
}

static void __exit glnv_hello_exit(void)
{
}

module_init(glnv_hello_init);
module_exit(glnv_hello_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("gl-nvidia test module that exports a symbol");
