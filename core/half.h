/* half.h - IEEE 754 binary16 ("float16", "half") <-> float32, exact and portable. */
#ifndef KST_HALF_H
#define KST_HALF_H

/* Half (bits) to float, exact: subnormals, infinities and NaN included. */
float kst_f16_to_f32(unsigned short h);
/* Float to half bits, round to nearest even; overflow goes to infinity, NaN stays NaN. */
unsigned short kst_f32_to_f16(float f);

#endif
