# A 512-byte MBR for the firmware matrix (GNU as, 16-bit real mode, loaded
# at 0:7c00 by the BIOS). It writes "MBR-MARKER-1 booted from BIOS drive
# 0xNN" to COM1, reads LBA 1..64 (64 sectors, 32 KiB) in one INT 13h AH=42h
# call to 0800:0000 and prints the strings the image holds at LBA 1 and at
# LBA 64. "LBA64-MARKER-OK" lives only in sector 64, so seeing it on the
# serial port means a multi-sector read went through the firmware's USB
# driver. On an error it prints "INT13-ERROR ah=0xNN". Then it halts.
# Partition 1 (FAT16, type 0xEF, active, LBA 2048..end) is in the table.
	.code16
	.text
	.globl _start
_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	$0x7c00, %sp
	sti
	cld
	mov	%dl, drive
	mov	$msg_boot, %si
	call	puts
	mov	drive, %al
	call	puthex
	call	crlf
	# INT 13h AH=42h: extended read, DS:SI = disk address packet.
	mov	$dap, %si
	mov	drive, %dl
	mov	$0x42, %ah
	int	$0x13
	jc	fail
	# LBA 1 is at 0800:0000, LBA 64 at 0800:7e00.
	mov	$0x0800, %ax
	mov	%ax, %ds
	xor	%si, %si
	call	puts
	call	crlf
	mov	$0x7e00, %si
	call	puts
	call	crlf
	jmp	halt
fail:
	push	%ax
	mov	$msg_err, %si
	call	puts
	pop	%ax
	mov	%ah, %al
	call	puthex
	call	crlf
halt:
	cli
1:	hlt
	jmp	1b

# putc: AL to COM1, waiting for the transmitter holding register.
putc:
	push	%dx
	push	%ax
	mov	$0x3fd, %dx
1:	in	%dx, %al
	test	$0x20, %al
	jz	1b
	pop	%ax
	mov	$0x3f8, %dx
	out	%al, %dx
	pop	%dx
	ret
# puts: the NUL-terminated string at DS:SI (at most 80 bytes).
puts:
	mov	$80, %cx
1:	lodsb
	test	%al, %al
	jz	2f
	call	putc
	loop	1b
2:	ret
crlf:
	mov	$13, %al
	call	putc
	mov	$10, %al
	jmp	putc
# puthex: AL as 0xNN.
puthex:
	push	%ax
	mov	$'0', %al
	call	putc
	mov	$'x', %al
	call	putc
	pop	%ax
	push	%ax
	shr	$4, %al
	call	nibble
	pop	%ax
nibble:
	and	$0x0f, %al
	add	$'0', %al
	cmp	$'9', %al
	jbe	putc
	add	$7, %al
	jmp	putc

msg_boot: .asciz "MBR-MARKER-1 booted from BIOS drive "
msg_err:  .asciz "INT13-ERROR ah="
drive:	.byte 0
	.balign 4
dap:	.byte 16, 0
	.word 64		# sectors
	.word 0, 0x0800		# buffer offset, segment
	.quad 1			# first LBA

	.org 0x1be
	# Partition 1: active, FAT (ESP type 0xEF), LBA 2048, 129024 sectors.
	.byte 0x80, 0x20, 0x21, 0x00	# status, CHS start (0/32/33)
	.byte 0xef, 0xfe, 0xff, 0xff	# type, CHS end (max)
	.long 2048, 129024
	.org 0x1fe
	.byte 0x55, 0xaa
